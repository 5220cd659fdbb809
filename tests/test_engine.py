"""The runtime's decoder: dense equals HF, simulate equals compute, prefills are never touched by actions."""
import pytest
import torch

from sol.actions import ActionSettings
from sol.engine import Engine

ACTIONS = [  # (token_keep, prune_keep, bits) per row of a 3-row batch: single axes, joint, and mixed rows
    ([0.3] * 3, [1.0] * 3, [16] * 3),
    ([1.0] * 3, [0.5] * 3, [16] * 3),
    ([1.0] * 3, [1.0] * 3, [5] * 3),
    ([0.4] * 3, [0.6] * 3, [6] * 3),
    ([0.1, 1.0, 0.5], [0.4, 0.7, 1.0], [5, 16, 8]),
]


def _tensors(tk, pk, b):
    return torch.tensor(tk), torch.tensor(pk), torch.tensor(b)


def test_dense_matches_hf(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 48))
    ref = tiny(ids).logits
    e = Engine(tiny)
    cache = e.new_cache(2, 4)  # small capacity: exercises growth
    logits, _ = e.extend(ids[:, :32], cache)
    assert torch.allclose(logits, ref[:, :32], atol=1e-5)
    one = torch.ones(2)
    for t in range(32, 48):
        logits, _ = e.step(ids[:, t], cache, one, one, torch.full((2,), 16))
        assert (logits - ref[:, t]).abs().max() <= 1e-5


@pytest.mark.parametrize("settings", [ActionSettings(), ActionSettings(faithful=True),
                                      ActionSettings(criterion="recency"), ActionSettings(page_size=4, sinks=0, window=2)])
@pytest.mark.parametrize("tk,pk,b", ACTIONS)
def test_simulate_equals_compute(tiny, settings, tk, pk, b):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 70))
    outs = []
    for mode in ("simulate", "compute"):
        e = Engine(tiny, settings, mode)
        cache = e.new_cache(3)
        e.extend(ids[:, :30], cache)
        outs.append(torch.stack([e.step(ids[:, t], cache, *_tensors(tk, pk, b))[0] for t in range(30, 70)]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    dense = Engine(tiny)
    cache = dense.new_cache(3)
    dense.extend(ids[:, :30], cache)
    one = torch.ones(3)
    ref = torch.stack([dense.step(ids[:, t], cache, one, one, torch.full((3,), 16))[0] for t in range(30, 70)])
    assert (outs[0] - ref).abs().max() > 1e-4  # the actions really change the computation


def test_rows_are_independent(tiny_llama):
    """A row's result depends only on its own action, not on the other rows' actions."""
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (1, 50)).repeat(3, 1)
    for mode in ("simulate", "compute"):
        e = Engine(tiny_llama, mode=mode)
        cache = e.new_cache(3)
        e.extend(ids[:, :40], cache)
        solo = e.new_cache(1)
        e.extend(ids[:1, :40], solo)
        for t in range(40, 50):
            mixed, _ = e.step(ids[:, t], cache, *_tensors([0.3, 1.0, 0.6], [0.5, 1.0, 0.8], [6, 16, 8]))
            alone, _ = e.step(ids[:1, t], solo, *_tensors([0.3], [0.5], [6]))
            assert torch.allclose(mixed[:1], alone, atol=1e-5)


def test_prefill_is_never_sparse(tiny_llama):
    """Regression for the reference's leak (§12.1): after aggressive steps, a new prefill is exactly dense."""
    torch.manual_seed(3)
    ids = torch.randint(0, 300, (2, 80))
    ref = tiny_llama(ids[:, :64]).logits
    e = Engine(tiny_llama, mode="simulate")
    cache = e.new_cache(2)
    e.extend(ids[:, :40], cache)
    for t in range(40, 50):
        e.step(ids[:, t], cache, *_tensors([0.1, 0.1], [0.4, 0.4], [5, 5]))
    fresh = e.new_cache(2)
    logits, _ = e.extend(ids[:, :64], fresh)
    assert torch.allclose(logits, ref, atol=1e-5)


def test_unsupported_runtime_arch():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sol.errors import SolError

    with pytest.raises(SolError, match="gpt2"):
        Engine(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


def test_incremental_page_metadata_survives_rewinds(tiny_llama):
    """Compute mode keeps QUEST page metadata in the cache (``KVCache.page_meta``): it equals the metadata recomputed
    from the keys after growth and after rewinds that rewrite earlier slots (a dense refresh, a benchmark's rewind),
    and the steps equal the simulate path that recomputes it every time."""
    torch.manual_seed(2)
    s = ActionSettings(page_size=4, sinks=2, window=4)
    ids = torch.randint(0, 300, (2, 60))
    other = torch.randint(0, 300, (2, 60))
    tk, pk, b = torch.tensor([0.3, 0.5]), torch.ones(2), torch.full((2,), 16)
    out = {}
    for mode in ("simulate", "compute"):
        e = Engine(tiny_llama, s, mode)
        cache = e.new_cache(2, 4)
        e.extend(ids[:, :30], cache)
        steps = [e.step(ids[:, t], cache, tk, pk, b)[0] for t in range(30, 45)]  # metadata grows page by page
        cache.length = 21                                                       # rewind into a summarised page
        e.extend(other[:, 21:40], cache)                                        # rewrite slots 21..39
        steps += [e.step(other[:, t], cache, tk, pk, b)[0] for t in range(40, 50)]
        for _ in range(3):                                                      # a benchmark's rewind loop
            cache.length = 45
            steps.append(e.step(other[:, 45], cache, tk, pk, b)[0])
        out[mode] = torch.stack(steps)
        if mode == "compute":
            for i in range(len(e.layers)):
                n = cache.length // s.page_size
                kmax, kmin = cache.page_meta(i, s.page_size, n)
                keys = cache.k[i][:, :, :n * s.page_size].float().unflatten(2, (n, s.page_size))
                assert torch.equal(kmax, keys.amax(3)) and torch.equal(kmin, keys.amin(3))
    assert torch.allclose(out["simulate"], out["compute"], atol=1e-5)

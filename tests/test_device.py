"""The engine's exactness on the device named by ``SOL_TEST_DEVICE`` (default cpu; ``benchmarks/gpu_check.sh`` runs
this module with cuda): dense equals HF, simulate equals compute, dense refresh equals a teacher-forced HF forward,
a ragged batch equals its rows alone."""
import os

import pytest
import torch

from sol.actions import Action, ActionSettings, grid_from
from sol.controllers import Dense
from sol.engine import Engine
from sol.models import load
from sol.runtime import Runtime

DEVICE = os.environ.get("SOL_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the tolerances below are fp32's


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request):
    return load(request.param, device=DEVICE)[0]


def _ids(*shape, seed=0):
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_dense_extend_and_steps_equal_hf(model):
    ids = _ids(2, 40)
    ref = model(ids).logits
    e = Engine(model)
    cache = e.new_cache(2, 4)
    logits, _ = e.extend(ids[:, :24], cache)
    assert (logits - ref[:, :24]).abs().max() <= 1e-4
    one = torch.ones(2)
    for t in range(24, 40):
        logits, _ = e.step(ids[:, t], cache, one, one, torch.full((2,), 16))
        assert (logits - ref[:, t]).abs().max() <= 1e-4


@pytest.mark.parametrize("tk,pk,b", [([0.3, 1.0, 0.5], [0.4, 0.7, 1.0], [5, 16, 8]), ([0.25] * 3, [0.5] * 3, [16] * 3)])
def test_simulate_equals_compute(model, tk, pk, b):
    ids = _ids(3, 60, seed=1)
    out = []
    for mode in ("simulate", "compute"):
        e = Engine(model, ActionSettings(page_size=4, sinks=2, window=4), mode)
        cache = e.new_cache(3)
        e.extend(ids[:, :30], cache)
        out.append(torch.stack([e.step(ids[:, t], cache, torch.tensor(tk), torch.tensor(pk), torch.tensor(b))[0]
                                for t in range(30, 60)]))
    assert (out[0] - out[1]).abs().max() <= 1e-4


def test_dense_refresh_equals_a_teacher_forced_forward(model):
    ids = _ids(2, 45, seed=2)
    ref = model(ids).logits.float().log_softmax(-1)
    rt = Runtime(Engine(model), grid_from("J-2L"))
    ro = rt.rollout(ids, Dense(rt.grid), 1.0, 24, episode=5)
    expect = ref[:, 24:44].gather(2, ids[:, 25:45, None])[..., 0].cpu()  # step t reads token 24+t, scores 25+t
    assert (ro.logprobs - expect).abs().max() <= 1e-4


def test_ragged_batch_equals_rows_alone(model):
    g = grid_from("J-3L")
    rt = Runtime(Engine(model, ActionSettings(page_size=4, sinks=2, window=3), "compute"), g)
    T, lengths = 6, [30, 17, 24]
    rows = [_ids(n + T + 1, seed=10 + i) for i, n in enumerate(lengths)]
    L = max(lengths)
    blocks = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long, device=DEVICE), r])
                          for n, r in zip(lengths, rows)])
    from sol.controllers import FixedAction

    ctrl = FixedAction(g, Action(0.6, 0.4, 5))
    batch = rt.rollout(blocks, ctrl, 1.0, L, episode=4, pad=torch.tensor([L - n for n in lengths]))
    for i, (n, r) in enumerate(zip(lengths, rows)):
        alone = rt.rollout(r[None], ctrl, 1.0, n, episode=4)
        assert (batch.logprobs[i] - alone.logprobs[0]).abs().max() <= 1e-4

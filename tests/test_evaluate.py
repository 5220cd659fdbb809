"""sol eval ppl: every controller spec runs through one runtime; dense equals HF; paired and front comparisons."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sol.compare import bracket, pareto_front, versus_front
from sol.errors import SolError
from sol.evaluate import eval_ppl, paired
from sol.registry import build

SPECS = ["dense", "uniform:0.5,0.5,8", "matched:grid=J-3L,token_keep=0.5,prune_keep=0.7,bits=9",
         "random:grid=J-3L,token_keep=0.5,prune_keep=0.7,bits=9,seed=1", "emc:grid=J-3L,prune_keep=0.7",
         "dac:grid=J-3L,prune_keep=0.7", "weights:bits=4,group=32", "heads:keep=0.5"]


def test_every_controller_evaluates(tiny_llama):
    torch.manual_seed(0)
    blocks = torch.randint(0, 300, (6, 41))
    calib = torch.randint(0, 300, (4, 41))
    summary, per_block = eval_ppl(tiny_llama, "tiny-llama", blocks, SPECS, [0.8], context=24, episode=8, batch=4,
                                  calibration=calib)
    assert list(summary.method) == ["dense", "uniform:k050-s050-q8", *SPECS[2:6], "weights:int4-g32", "heads:keep=0.5"]
    dense = summary.iloc[0]
    lp = tiny_llama(blocks).logits.log_softmax(-1)[:, 24:-1].gather(-1, blocks[:, 25:, None])
    assert dense.ppl == pytest.approx(math.exp(-lp.mean().item()), rel=1e-5)
    assert dense.flop_keep == 1.0 and (summary.flop_keep.iloc[1:] < 1).all()
    assert (summary.ppl_lo <= summary.ppl).all() and (summary.ppl <= summary.ppl_hi).all()
    assert len(per_block) == 6 * len(SPECS)
    d = paired(per_block, ("uniform:k050-s050-q8", np.nan), ("dense", np.nan))
    assert d["lo"] <= d["delta_nll"] <= d["hi"]


def test_registry_errors():
    with pytest.raises(SolError, match="unknown controller 'fixd'"):
        build("fixd:0.5")
    with pytest.raises(SolError, match="bad uniform spec"):
        build("uniform:0.5,0.5")
    with pytest.raises(SolError, match="checkpoint not found"):
        build("policy:/no/such.pt")


def test_pareto_front_and_interpolation():
    df = pd.DataFrame({"method": list("abcd"), "budget": [np.nan] * 4, "flop_keep": [0.5, 0.6, 0.7, 0.8],
                       "ppl": [30.0, 31.0, 25.0, 24.0]})
    front = pareto_front(df)
    assert list(front.method) == ["a", "c", "d"]
    assert bracket(front, 0.65) == (0, 1, pytest.approx(0.75)) and bracket(front, 0.4) is None
    assert bracket(front, 0.9) == (2, 2, 0.0)  # beyond the last point it holds (reachable with less compute)
    per_block = pd.DataFrame({"method": ["a", "a", "c", "c", "d", "d", "p", "p"], "budget": [np.nan] * 6 + [0.6, 0.6],
                              "block": [0, 1] * 4, "nll": [3.0, 3.2, 2.0, 2.2, 1.0, 1.0, 2.0, 2.4]})
    r = versus_front(per_block, ("p", 0.6), front, 0.6)
    assert r["delta_nll"] == pytest.approx(np.mean([2.0 - 2.5, 2.4 - 2.7]))

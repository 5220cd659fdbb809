"""Policy and GRPO training on the tiny model: equal step/sequence logits, learning signal, bitwise resume after
kill -9, checkpoint validation, document splits, DDP with gloo."""
import os
import random
import signal
import subprocess
import sys

import pytest
import numpy as np
import torch

from sol.errors import SolError
from sol.policy import Policy, PolicyConfig

ARGS = ["model=tiny-llama", "context=32", "episode=8", "rollouts=4", "blocks_per_update=2", "minibatches=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    (d / "corpus.txt").write_text("\n\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(60)))
    return d


def _train(corpus, out, *extra, kill_after=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOL_CACHE": str(corpus / "cache"), "HF_HUB_OFFLINE": "1"}
    if kill_after:
        env["SOL_TEST_KILL_AFTER"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "sol.cli", "train", "--out", str(out), "--set", *ARGS,
                           f"data={corpus / 'corpus.txt'}", *extra], capture_output=True, text=True, env=env)


def test_step_and_sequence_logits_agree():
    torch.manual_seed(0)
    cfg = PolicyConfig(d_lm=32, n_actions=12, n_budget=3, d_model=64, n_layers=2)
    p = Policy(cfg).eval()
    B, T = 3, 9
    h, e, s = torch.randn(B, T, 32), torch.randn(B, T, 32), torch.randn(B, T, cfg.scalar_dim)
    prev, c = torch.randint(-1, 12, (B, T)), torch.rand(B, 3)
    full = p.forward_sequence(h, e, s, prev, c)
    state = p.new_state()
    steps = torch.stack([p.step(state, h[:, t], e[:, t], s[:, t], prev[:, t], c) for t in range(T)], 1)
    assert torch.allclose(full, steps, atol=1e-5)


def test_resume_after_kill_is_bitwise(corpus, tmp_path):
    full = _train(corpus, tmp_path / "full", "updates=6", "checkpoint_every=2")
    assert full.returncode == 0, full.stderr
    killed = _train(corpus, tmp_path / "resumed", "updates=6", "checkpoint_every=2", kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "policy.pt").exists()
    resumed = _train(corpus, tmp_path / "resumed", "updates=6", "checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "policy.pt", weights_only=False)["policy"]
    b = torch.load(tmp_path / "resumed" / "policy.pt", weights_only=False)["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 7 and "ratio_max_dev" in metrics[0]


def test_ratio_moves_unless_faithful(corpus, tmp_path):
    import pandas as pd

    assert _train(corpus, tmp_path / "ppo", "updates=2").returncode == 0
    assert (pd.read_csv(tmp_path / "ppo" / "metrics.csv").ratio_max_dev > 1e-3).all()
    assert _train(corpus, tmp_path / "ref", "updates=2", "faithful_update=true").returncode == 0
    assert (pd.read_csv(tmp_path / "ref" / "metrics.csv").ratio_max_dev < 1e-4).all()


def test_tracked_training_keeps_the_ratio_exact_and_meets_budgets(corpus, tmp_path):
    """track_budget: the tilt is part of the sampling distribution, so the recomputed log-probs of an unchanged policy
    equal the recorded ones (ratio ≡ 1 with one faithful pass), the budget is met in training, and the checkpoint
    runs with its tracker even when asked for the plain policy."""
    import pandas as pd

    from sol.registry import build

    out = tmp_path / "tracked"
    r = _train(corpus, out, "updates=2", "faithful_update=true", "track_budget=true", "logp_weight=0", "kl_weight=1",
               "budget_range=[0.6,0.9]")
    assert r.returncode == 0, r.stderr
    m = pd.read_csv(out / "metrics.csv")
    assert (m.ratio_max_dev < 1e-4).all()
    assert (m.budget_err < 0.03).all()
    assert build(f"policy:{out / 'policy.pt'}", "tiny-llama").controller.track_budget


def test_checkpoint_validation(corpus, tmp_path):
    from sol.actions import grid_from
    from sol.train import load_policy

    assert _train(corpus, tmp_path / "r", "updates=1").returncode == 0
    ck = tmp_path / "r" / "policy.pt"
    policy, meta = load_policy(ck, "tiny-llama")
    assert meta["model"] == "tiny-llama"
    with pytest.raises(SolError, match="trained for model 'tiny-llama', not 'smollm2-135m'"):
        load_policy(ck, "smollm2-135m")
    with pytest.raises(SolError, match="action grid"):
        load_policy(ck, "tiny-llama", grid_from("J-2L"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(SolError, match="corrupt checkpoint"):
        load_policy(bad)


def test_bad_config_key_is_one_line(corpus, tmp_path):
    r = _train(corpus, tmp_path / "x", "updatez=3")
    assert r.returncode == 2 and "unknown train config key 'updatez'" in r.stderr
    assert not (tmp_path / "x" / "policy.pt").exists()


@pytest.mark.parametrize("kv, needle", [("updates=seventy", "'updates' must be an integer, got 'seventy'"),
                                        ("budget_range=[0.5,x]", "'budget_range' must be list[float]"),
                                        ("track_budget=3", "'track_budget' must be true or false"),
                                        ("lr=fast", "'lr' must be a number")])
def test_config_value_types_are_checked(corpus, tmp_path, kv, needle):
    """A value of the wrong type is one error line and exit 2, before anything is written."""
    r = _train(corpus, tmp_path / "x", kv)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [r.stderr.strip()]
    assert not (tmp_path / "x").exists()


def test_splits_are_disjoint_by_document(corpus):
    from sol.data import documents

    keys = {s: {k for k, _ in documents(str(corpus / "corpus.txt"), s)} for s in ("train", "validation", "test")}
    assert keys["train"] and keys["test"]
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert not (keys["validation"] & keys["test"])


def test_ddp_two_processes_gloo(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOL_CACHE": str(corpus / "cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "-m", "sol.cli", "train", "--out", str(tmp_path / "ddp"), "--set", *ARGS,
                        f"data={corpus / 'corpus.txt'}", "updates=2"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ddp" / "policy.pt").is_file()


def test_policy_eval_with_paper_baselines(corpus, tmp_path):
    """A trained checkpoint evaluates as `policy` and `policy-tracked`; the paper's baselines match its averages."""
    from sol.evaluate import eval_ppl, paper_baselines
    from sol.models import load
    from sol.registry import build

    assert _train(corpus, tmp_path / "r", "updates=1").returncode == 0
    ck = tmp_path / "r" / "policy.pt"
    model, _ = load("tiny-llama")
    torch.manual_seed(0)
    blocks, selection = torch.randint(0, 300, (4, 49)), torch.randint(0, 300, (2, 49))
    specs = [f"policy-tracked:{ck}", f"policy:{ck}"]
    summary, per_block = eval_ppl(model, "tiny-llama", blocks, specs, [0.7, 0.9], context=32, episode=8, batch=4)
    tracked = summary[summary.method == "policy-tracked"]
    assert (tracked.total_keep > tracked.flop_keep).all()
    assert ((tracked.flop_keep - tracked.budget).abs() < 0.05).all()
    extra, extra_blocks = paper_baselines(model, "tiny-llama", summary, blocks, selection,
                                          build(specs[0]).grid, 32, 8, 4, n_random=2, primary="policy-tracked")
    assert {"matched", "emc", "dac", "random:seed=0", "random:seed=1", "random-best", "static-best"} == set(extra.method)
    res = one_step_resolution(build(specs[0]).grid, 32, 16, 8)
    for b in (0.7, 0.9):  # matched compute: the schedule baselines track the policy's total keep within one step
        p = tracked[tracked.budget == b].iloc[0]
        for name in ("matched", "emc", "dac", "random:seed=0", "random:seed=1"):
            m = extra[(extra.method == name) & (extra.budget == b)].iloc[0]
            goal = min(p.total_keep, 1.0)  # the tiny LM's policy costs more than its LM: then dense is all there is
            assert abs(m.flop_keep - goal) <= res, (name, b, m.flop_keep, p.total_keep, res)
    best = extra[extra.method.isin(["random-best", "static-best"])]
    assert (best.selected_on == "selection split").all()
    assert len(extra_blocks) == len(extra) * 4
    static = extra[extra.method == "static-best"].set_index("budget")
    assert (static.flop_keep <= tracked.set_index("budget").flop_keep + 1e-9).all()  # never more compute than SOL


def one_step_resolution(grid, context: int, steps: int, episode: int) -> float:
    """How far one step's choice moves an episode's mean FLOP keep: the largest keep change from moving one axis of
    one action by one level, over the episode length (the granularity any per-axis schedule has)."""
    from sol.cost import CostModel
    from sol.models import load

    from sol.actions import ActionSettings

    cost = CostModel(load("tiny-llama")[0].config, ActionSettings())
    worst = 0.0
    idx = {(a.token_keep, a.prune_keep, a.bits): i for i, a in enumerate(grid.actions)}
    for t in range(steps):
        table = cost.keep_table(grid, context + t + 1)
        for (k, p, b), i in idx.items():
            for axis, levels in ((0, grid.token_keep), (1, grid.prune_keep), (2, grid.bits)):
                key = [k, p, b]
                j = list(levels).index(key[axis])
                if j + 1 < len(levels):
                    key[axis] = levels[j + 1]
                    worst = max(worst, abs(float(table[idx[tuple(key)]] - table[i])))
    return worst / episode


def test_static_sweep_equals_each_fixed_action_alone():
    """All fixed actions in one batched pass (one prefill per block) == each action's own rollout."""
    from sol.actions import ActionGrid
    from sol.controllers import FixedAction
    from sol.engine import Engine
    from sol.evaluate import static_sweep
    from sol.models import load
    from sol.runtime import Runtime

    model, _ = load("tiny-llama")
    grid = ActionGrid(token_keep=(0.5, 1.0), prune_keep=(0.5, 1.0), bits=(6, 16))
    runtime = Runtime(Engine(model), grid)
    blocks = torch.randint(0, 300, (3, 49), generator=torch.Generator().manual_seed(0))
    sweep = static_sweep(runtime, grid, blocks, 32, 8, max_rows=2 * len(grid))
    assert len(sweep) == len(grid)
    part = static_sweep(runtime, grid, blocks, 32, 8, max_rows=6, actions=[5, 1, 2])  # a subset: the same numbers
    assert part.action.tolist() == [5, 1, 2]
    assert np.allclose(part.nll, sweep.nll[[5, 1, 2]], atol=1e-6) and np.allclose(part.flop_keep, sweep.flop_keep[[5, 1, 2]])
    for a in range(len(grid)):
        ro = runtime.rollout(blocks, FixedAction(grid, grid[a]), 1.0, 32, episode=8)
        assert abs(ro.nll.mean().item() - sweep.nll[a]) < 1e-5
        assert abs(ro.mean_flop_keep().mean().item() - sweep.flop_keep[a]) < 1e-9


def test_oracle_supervision_pretrains_then_grpo_and_names_the_variant(corpus, tmp_path):
    """oracle_init_blocks (ours): the greedy KL oracle labels train blocks, the policy is pre-trained on its actions
    (cross-entropy falls, agreement rises), GRPO follows, and the checkpoint is the `policy-os` variant: it loads as
    policy-os:PATH and is refused as policy:PATH. A run resumed after the pre-training does not label again, and
    ends bitwise where the uninterrupted run ends."""
    import pandas as pd

    from sol.registry import build

    extra = ("updates=4", "checkpoint_every=1", "oracle_init_blocks=6", "oracle_init_epochs=8", "kl_weight=1",
             "logp_weight=0", "track_budget=true", "grid=J-2L")
    full = _train(corpus, tmp_path / "os", *extra)
    assert full.returncode == 0, full.stderr
    log = pd.read_csv(tmp_path / "os" / "oracle_init.csv")
    assert len(log) == 8 and log.loss.iloc[-1] < log.loss.iloc[0] and log.agreement.iloc[-1] > log.agreement.iloc[0]
    assert log.labels.iloc[0] == 6 * 8 and log.distinct_oracle_actions.iloc[0] > 1  # it allocates, not one level
    ck = torch.load(tmp_path / "os" / "policy.pt", weights_only=False)
    assert ck["variant"] == "policy-os" and ck["update"] == 4 and len(ck["oracle_init"]) == 8
    assert build(f"policy-os:{tmp_path / 'os' / 'policy.pt'}", "tiny-llama").controller.name == "policy-os"
    with pytest.raises(SolError, match="'policy-os' checkpoint: use policy-os:PATH"):
        build(f"policy:{tmp_path / 'os' / 'policy.pt'}", "tiny-llama")
    killed = _train(corpus, tmp_path / "os2", *extra, kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(corpus, tmp_path / "os2", *extra)
    assert resumed.returncode == 0 and "oracle labels" not in resumed.stderr
    b = torch.load(tmp_path / "os2" / "policy.pt", weights_only=False)["policy"]
    assert all(torch.equal(ck["policy"][k], b[k]) for k in b)


def test_difficulty_inputs_reach_the_policy_and_are_costed(corpus, tmp_path):
    """difficulty_inputs (ours): the policy reads the entropy and top-1 probability of the LM's previous logits; its
    step MACs count the softmax over the vocabulary; the checkpoint runs as a controller."""
    from sol.policy import difficulty
    from sol.registry import build
    from sol.runtime import Runtime
    from sol.engine import Engine
    from sol.models import load

    uniform = torch.zeros(2, 4)
    peaked = torch.tensor([[10.0, 0, 0, 0]]).expand(2, 4)
    assert torch.allclose(difficulty(uniform), torch.tensor([[np.log(4), 0.25]] * 2).float())
    assert (difficulty(peaked)[:, 0] < 0.01).all() and (difficulty(peaked)[:, 1] > 0.99).all()
    r = _train(corpus, tmp_path / "d", "updates=2", "difficulty_inputs=true")
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "d" / "policy.pt", weights_only=False)
    assert ck["policy_config"]["difficulty_vocab"] == 320
    built = build(f"policy:{tmp_path / 'd' / 'policy.pt'}", "tiny-llama")
    plain = Policy(PolicyConfig(**{**ck["policy_config"], "difficulty_vocab": 0}))
    assert built.controller.step_macs() - plain.step_macs() == 320 + 2 * 64  # the softmax, and 2 more scalar inputs
    rt = Runtime(Engine(load("tiny-llama")[0]), built.grid)
    ro = rt.rollout(torch.randint(0, 300, (2, 45)), built.controller, 0.7, 32)
    assert ro.logprobs.shape == (2, 12)

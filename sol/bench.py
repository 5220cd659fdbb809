"""``sol bench``: FLOPs and wall-clock of one decode step per action, on the compute path.

For each context length and action: fvcore MACs, analytic MACs, torch.utils.flop_counter MACs, FLOP keep,
median step time over ``--steps`` timed steps after warm-up (CUDA events on GPU, ``perf_counter`` on CPU) and the
time ratio vs dense **measured in the same run**; the byte roofline: bytes read per step (``CostModel.step_bytes``),
the bytes-keep (vs dense) and ``roofline_ratio`` = time ratio / bytes-keep (≈ 1: the action saves the time its bytes
say; > 1: overhead eats the saving). Actions are timed round-robin, one step each per round, so machine load
affects all of them alike. The KV cache is rewound after every step, so every timed step attends over
exactly ``kv_len`` keys.
"""
from __future__ import annotations

import statistics
import time

import pandas as pd
import torch
from tqdm import tqdm

from sol.actions import Action, ActionSettings
from sol.cost import CostModel, fvcore_step_macs, torch_step_macs
from sol.engine import Engine

DEFAULT_ACTIONS = [
    Action(),
    Action(token_keep=0.5), Action(token_keep=0.25),
    Action(prune_keep=0.5), Action(prune_keep=0.25),
    Action(bits=8), Action(bits=4),
    Action(0.5, 0.5, 8), Action(0.25, 0.5, 16),
]


class StepTimer:
    """Times a callable: CUDA events on GPU (synchronised), ``perf_counter`` on CPU. Returns milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def run_bench(model, model_name: str, kv_lens=(256, 1024), actions=None, steps: int = 30, warmup: int = 5,
              settings: ActionSettings | None = None, batch: int = 1, seed: int = 0, counters: bool = True
              ) -> pd.DataFrame:
    """One row per (kv_len, action). ``counters=False`` skips the fvcore and torch.utils.flop_counter counts (left
    empty): tracing a large model's step at long context takes longer than timing it."""
    actions = actions or DEFAULT_ACTIONS
    engine = Engine(model, settings or ActionSettings(), mode="compute")
    cost = CostModel.for_engine(engine)
    timer = StepTimer(engine.device)
    el = torch.finfo(engine.dtype).bits // 8
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kv_len in kv_lens:
        ids = torch.randint(0, model.config.vocab_size, (batch, kv_len), generator=g).to(engine.device)
        cache = engine.new_cache(batch, kv_len + 1)
        engine.extend(ids[:, :-1], cache)
        tok = ids[:, -1]
        times: dict[Action, list[float]] = {a: [] for a in actions}

        def one(a: Action):
            cache.length = kv_len - 1
            engine.step(tok, cache, torch.full((batch,), a.token_keep), torch.full((batch,), a.prune_keep),
                        torch.full((batch,), a.bits))

        for _ in range(warmup):
            for a in actions:
                one(a)
        for _ in tqdm(range(steps), desc=f"{model_name} kv_len={kv_len}", leave=False):
            for a in actions:
                times[a].append(timer(lambda: one(a)))
        dense_ms = statistics.median(times[actions[0]]) if actions[0].is_dense else None
        nbytes = {a: sum(cost.step_bytes(a, kv_len, el).values()) for a in actions}
        for a in actions:
            ms = statistics.median(times[a])
            rows.append(dict(
                model=model_name, kv_len=kv_len, batch=batch, action=a.tag, token_keep=a.token_keep,
                prune_keep=a.prune_keep, bits=a.bits,
                fvcore_macs=fvcore_step_macs(engine, a, kv_len) if counters else float("nan"),
                analytic_macs=cost.step_macs(a, kv_len),
                torch_macs_unweighted=torch_step_macs(engine, a, kv_len) if counters else float("nan"),
                analytic_macs_unweighted=cost.step_macs(a, kv_len, bit_weighted=False),
                flop_keep=cost.flop_keep(a, kv_len), net_keep=a.net_keep,
                step_bytes=nbytes[a],
                bytes_keep=nbytes[a] / sum(cost.step_bytes(Action(), kv_len, el).values()),
                median_ms=ms, time_ratio=ms / dense_ms if dense_ms else float("nan"),
                device=str(engine.device), threads=torch.get_num_threads(), timer="cuda_events" if timer.cuda else "perf_counter",
            ))
    out = pd.DataFrame(rows)
    out["roofline_ratio"] = out.time_ratio / out.bytes_keep  # ≈ 1: the action's time saving is its byte saving
    return out


def format_table(df: pd.DataFrame) -> str:
    cols = ["model", "kv_len", "action", "fvcore_macs", "analytic_macs", "flop_keep", "net_keep", "bytes_keep",
            "median_ms", "time_ratio", "roofline_ratio"]
    out = df[cols].copy()
    out["fvcore_macs"] = (out["fvcore_macs"] / 1e6).map(lambda v: "—" if v != v else f"{v:.2f}M")  # — : not counted
    out["analytic_macs"] = (out["analytic_macs"] / 1e6).map("{:.2f}M".format)
    for c in ("flop_keep", "net_keep", "bytes_keep", "time_ratio", "roofline_ratio"):
        out[c] = out[c].map("{:.3f}".format)
    out["median_ms"] = out["median_ms"].map("{:.2f}".format)
    return out.to_markdown(index=False)

"""The shared dense prefix: the part of every scored episode that no controller decides.

With a dense refresh every ``E`` steps (``sol.runtime``), episode k of a block starts from exactly the dense model's
KV cache over its first ``context + k·E`` tokens, whatever the controller did before. One dense teacher-forced pass
over a block set therefore serves every controller, budget, baseline, oracle and study of a run:

    prefill blocks[:, :C]                       → KV, and the state before episode 0's first step
    extend  blocks[:, C + (k−1)E : C + kE]      → KV, and the state before episode k's first step   (k = 1..n−1)

These are the very calls the sequential runtime makes (prefill, then one dense replay per finished episode), so an
episode started from the prefix computes what it computes in a sequential rollout. Once the prefix exists, the
(block, episode) pairs are independent and run as the rows of large batches (``Runtime.score``). Without refresh
(one episode per block) the context prefill is still shared.

A prefix lives in memory for the process (a few, least recently used first out) and on disk under
``$SOL_CACHE/prefix/``, keyed by everything it depends on: the model's weights (a fingerprint, so a weight-quantised
or head-pruned copy gets its own), dtype, the blocks' tokens, context and episode length. It does not depend on the
action settings (a dense pass takes no action). ``SOL_PREFIX_CACHE=0`` turns the disk copy off. Jobs that run side
by side and need the same prefix compute it once: the first holds a file lock while it computes, the others wait on
it and then read the file.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sol.engine import Engine, KVCache
from sol.io import atomic_path

_MEMORY: OrderedDict = OrderedDict()
_MEMORY_ENTRIES = 4


@dataclass
class DensePrefix:
    """Dense KV of blocks [N, C + T + 1] up to the last episode start, and the state before every episode."""

    k: list[torch.Tensor]      # per layer [N, Hkv, C + (n_episodes − 1)·E, hd]
    v: list[torch.Tensor]
    hidden: torch.Tensor       # [N, n_episodes, D] final-norm hidden state of the position before episode k
    context: int
    episode: int
    steps: int                 # T scored steps per block

    @property
    def n_episodes(self) -> int:
        return self.hidden.shape[1]

    def episode_start(self, k: int) -> int:
        """Tokens of dense context before episode k's first step."""
        return self.context + k * self.episode

    def episode_steps(self, k: int) -> int:
        return min(self.episode, self.steps - k * self.episode)

    def start(self, engine: Engine, rows: torch.Tensor, k: int, capacity: int) -> tuple[KVCache, torch.Tensor,
                                                                                          torch.Tensor]:
        """(cache, last logits, last hidden) of ``rows`` at the start of episode k: what ``Runtime.rollout(start=)``
        continues from. The cache is a fresh copy; the prefix itself is never written."""
        L = self.episode_start(k)
        cache = engine.new_cache(len(rows), max(capacity, L + 1))
        for dst, src in zip(cache.k + cache.v, self.k + self.v):
            for r, b in enumerate(rows.tolist()):  # row by row: no second full-size copy of the selected rows
                dst[r, :, :L] = src[b, :, :L]
        cache.length = L
        hidden = self.hidden[rows, k].to(engine.device)
        return cache, engine.lm_head(hidden), hidden


def fingerprint(engine: Engine) -> str:
    """A stable digest of the engine's weights (names, shapes, dtypes and a strided sample of every tensor)."""
    if getattr(engine, "_sol_fingerprint", None) is None:
        h = hashlib.sha256()
        for name, p in engine.hf.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
        engine._sol_fingerprint = h.hexdigest()
    return engine._sol_fingerprint


def _key(engine: Engine, blocks: torch.Tensor, context: int, episode: int) -> str:
    h = hashlib.sha256(f"{fingerprint(engine)}|{engine.dtype}|{tuple(blocks.shape)}|{context}|{episode}".encode())
    h.update(blocks.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _disk_path(key: str):
    from sol.models import cache_dir

    return cache_dir() / "prefix" / f"{key}.pt"


def compute(engine: Engine, blocks: torch.Tensor, context: int, episode: int, batch: int = 8,
            progress: bool = True) -> DensePrefix:
    """The dense pass itself (no caching): one prefill and n−1 episode replays per chunk of ``batch`` blocks."""
    N, n = blocks.shape
    T = n - context - 1
    E = episode or T
    n_ep = -(-T // E)
    L = context + (n_ep - 1) * E
    ks, vs, hs = [], [], []
    for i in tqdm(range(0, N, batch), desc="dense prefix", leave=False, disable=not progress):
        chunk = blocks[i:i + batch].to(engine.device)
        cache = engine.new_cache(chunk.shape[0], L + 1)
        hidden = []
        _, h = engine.extend(chunk[:, :context], cache, last_only=True)
        hidden.append(h[:, -1])
        for k in range(1, n_ep):
            _, h = engine.extend(chunk[:, context + (k - 1) * E:context + k * E], cache, last_only=True)
            hidden.append(h[:, -1])
        ks.append([t[:, :, :L].cpu() for t in cache.k])
        vs.append([t[:, :, :L].cpu() for t in cache.v])
        hs.append(torch.stack(hidden, 1).cpu())
    cat = lambda parts: [torch.cat(layer) for layer in zip(*parts)]  # noqa: E731
    return DensePrefix(cat(ks), cat(vs), torch.cat(hs), context, E, T)


def dense_prefix(engine: Engine, blocks: torch.Tensor, context: int, episode: int | None, batch: int = 8
                 ) -> DensePrefix:
    """The shared dense prefix of ``blocks`` (memory, then disk, then :func:`compute`)."""
    T = blocks.shape[1] - context - 1
    episode = min(episode or T, T)
    key = _key(engine, blocks, context, episode)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = _disk_path(key)
    if os.environ.get("SOL_PREFIX_CACHE", "1") == "0":
        pre = compute(engine, blocks, context, episode, batch)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:  # jobs running side by side compute a prefix once: the
            fcntl.flock(lock, fcntl.LOCK_EX)                # others wait for it here, then read it from disk
            pre = _load(path)
            if pre is None:
                pre = compute(engine, blocks, context, episode, batch)
                with atomic_path(path) as tmp:
                    torch.save({"k": pre.k, "v": pre.v, "hidden": pre.hidden, "context": pre.context,
                                "episode": pre.episode, "steps": pre.steps}, tmp)
    _MEMORY[key] = pre
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return pre


def _load(path) -> DensePrefix | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, weights_only=True)
        return DensePrefix(d["k"], d["v"], d["hidden"], int(d["context"]), int(d["episode"]), int(d["steps"]))
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None


@torch.no_grad()
def dense_log_distributions(engine: Engine, pre: DensePrefix, blocks: torch.Tensor) -> torch.Tensor:
    """[N, T, V] the dense model's next-token log-distributions at every scored step of a one-episode prefix: one
    teacher-forced multi-token pass from the prefix (the KL reward's reference)."""
    if pre.n_episodes != 1:
        raise ValueError("dense_log_distributions needs a one-episode prefix")
    rows = torch.arange(blocks.shape[0])
    cache, _, _ = pre.start(engine, rows, 0, blocks.shape[1] + 1)
    logits, _ = engine.extend(blocks[:, pre.context:pre.context + pre.steps].to(engine.device), cache)
    return logits.float().log_softmax(-1).cpu()


class ContextMemo:
    """Dense prefills of single contexts, shared by every controller of a process (MMLU: the question context of a
    request group is the same for every controller, budget and baseline). Keyed by the engine's weights fingerprint
    and the context's tokens; holds per layer the context's keys and values, its last logits and hidden state.
    Entries are kept first come, first kept, up to ``SOL_PREFIX_MEMORY_GB`` (default 4): controllers visit the
    contexts in the same order, so evicting the oldest would evict every entry before its reuse."""

    def __init__(self):
        self.entries: dict = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @property
    def limit(self) -> float:
        return float(os.environ.get("SOL_PREFIX_MEMORY_GB", "4")) * 2 ** 30

    def get(self, engine: Engine, tokens: tuple):
        hit = self.entries.get((fingerprint(engine), tokens))
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, engine: Engine, tokens: tuple, kv: list[torch.Tensor], logits: torch.Tensor, hidden: torch.Tensor):
        size = sum(t.numel() * t.element_size() for t in kv) + logits.numel() * logits.element_size()
        if self.bytes + size <= self.limit:
            self.entries[(fingerprint(engine), tokens)] = (kv, logits, hidden)
            self.bytes += size

    def clear(self):
        self.__init__()


CONTEXTS = ContextMemo()

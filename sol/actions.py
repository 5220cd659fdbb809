"""The three per-decode-step efficiency actions and the flat action grid.

An *action* is one triple (token keep κ, MLP prune keep ρ, activation bits b) chosen per decode step and per batch
row, and applied to every layer:

* **token keep κ** — attention reads only part of the KV cache. ``quest`` (default): keys are split into pages of
  ``page_size`` aligned at position 0; a page's score for a query head is the QUEST upper bound
  Σ_d max(q_d·max_d, q_d·min_d) (GQA-aware: key metadata is per KV head, scores per query head); the top
  ⌈⌈κ·K⌉/page⌉ pages are kept. ``recency``: keep the most recent ⌈κ·n_old⌉ old tokens.
  Our default also always keeps the first ``sinks`` tokens and the ``window`` most recent tokens (the current one
  included) and spends the page budget on the tokens in between. The reference forces neither; ``faithful=True``
  reproduces that (sinks/window then only decide which steps are "effective").
* **MLP prune keep ρ** — per token, keep the ⌈ρ·D⌉ MLP-input channels with the largest |x| and zero the rest, so a
  kernel reads only those columns of W_gate and W_up.
* **activation bits b** — per-token symmetric absmax fake quantisation. Default: the *inputs* of the MLP GEMMs
  (gate/up input and down input), so an integer GEMM could use them and the bit-weighted cost is honest.
  ``faithful=True``: the MLP *output* is quantised, as the reference does. b ≥ 16 is the exact identity.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from sol.errors import SolError

DENSE_BITS = 16


@dataclass(frozen=True)
class Action:
    token_keep: float = 1.0
    prune_keep: float = 1.0
    bits: int = DENSE_BITS

    def __post_init__(self):
        if not (0 < self.token_keep <= 1 and 0 < self.prune_keep <= 1 and 2 <= self.bits <= DENSE_BITS):
            raise SolError(f"action (token_keep={self.token_keep}, prune_keep={self.prune_keep}, bits={self.bits}) "
                           f"out of range: keeps must be in (0, 1] and bits in [2, {DENSE_BITS}]")

    @property
    def is_dense(self) -> bool:
        return self.token_keep >= 1.0 and self.prune_keep >= 1.0 and self.bits >= DENSE_BITS

    @property
    def tag(self) -> str:
        return f"k{round(self.token_keep * 100):03d}-s{round(self.prune_keep * 100):03d}-q{self.bits}"

    @property
    def net_keep(self) -> float:
        """The reference's "net keep": the unweighted mean of κ, ρ and b/16 (not a cost)."""
        return (self.token_keep + self.prune_keep + min(self.bits, DENSE_BITS) / DENSE_BITS) / 3


@dataclass(frozen=True)
class ActionSettings:
    """How actions are realised (shared by every controller so comparisons differ only in the controller)."""

    criterion: str = "quest"   # quest | recency
    page_size: int = 8
    sinks: int = 4
    window: int = 8
    faithful: bool = False     # reproduce the reference: no forced sinks/window, quantise the MLP output

    def __post_init__(self):
        if self.criterion not in ("quest", "recency"):
            raise SolError(f"unknown token criterion '{self.criterion}': use quest or recency")
        if self.page_size < 1 or self.sinks < 0 or self.window < 0:
            raise SolError("page_size must be >= 1 and sinks/window >= 0")

    @property
    def forced_sinks(self) -> int:
        return 0 if self.faithful else self.sinks

    @property
    def forced_window(self) -> int:
        return 0 if self.faithful else self.window

    def effective(self, kv_len: int) -> bool:
        """Steps with kv_len <= sinks + window + 1 are forced dense (and excluded from budget averages)."""
        return kv_len > self.sinks + self.window + 1


@dataclass
class ActionGrid:
    """Flat Cartesian product κ (outer) × ρ × b (inner); index a = iκ·(Nρ·Nb) + iρ·Nb + ib."""

    token_keep: tuple[float, ...] = (1.0,)
    prune_keep: tuple[float, ...] = (1.0,)
    bits: tuple[int, ...] = (DENSE_BITS,)
    actions: list[Action] = field(init=False)

    def __post_init__(self):
        for name, levels, lo, hi in (("token_keep", self.token_keep, 0.0, 1.0), ("prune_keep", self.prune_keep, 0.0, 1.0),
                                     ("bits", self.bits, 2, DENSE_BITS)):
            if not levels:
                raise SolError(f"action grid axis '{name}' has no levels")
            for v in levels:
                if not (lo < v <= hi if name != "bits" else lo <= v <= hi):
                    raise SolError(f"action grid level {name}={v} out of range ({lo}, {hi}]")
        self.token_keep = tuple(sorted(float(v) for v in self.token_keep))
        self.prune_keep = tuple(sorted(float(v) for v in self.prune_keep))
        self.bits = tuple(sorted(int(v) for v in self.bits))
        self.actions = [Action(k, p, b) for k, p, b in itertools.product(self.token_keep, self.prune_keep, self.bits)]

    @classmethod
    def from_config(cls, cfg: dict) -> "ActionGrid":
        unknown = set(cfg) - {"token_keep", "prune_keep", "bits"}
        if unknown:
            raise SolError(f"unknown action grid key(s): {', '.join(sorted(unknown))} (use token_keep, prune_keep, bits)")
        return cls(**{k: tuple(v) for k, v in cfg.items()})

    def to_config(self) -> dict:
        return {"token_keep": list(self.token_keep), "prune_keep": list(self.prune_keep), "bits": list(self.bits)}

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, i: int) -> Action:
        return self.actions[i]

    @property
    def dense_index(self) -> int:
        """Index of (1, 1, 16) if on the grid, else the most expensive action (max of every axis)."""
        return len(self.actions) - 1

    def index(self, action: Action) -> int:
        try:
            return self.actions.index(action)
        except ValueError:
            raise SolError(f"action {action.tag} is not on the grid") from None

    def tensors(self, device=None) -> dict[str, torch.Tensor]:
        """Per-action attribute tables, for vectorised lookup of a batch of action ids."""
        return {
            "token_keep": torch.tensor([a.token_keep for a in self.actions], device=device),
            "prune_keep": torch.tensor([a.prune_keep for a in self.actions], device=device),
            "bits": torch.tensor([a.bits for a in self.actions], device=device),
        }


# Named grids of the reference (reference-spec §10) plus small CPU-sized defaults.
GRIDS = {
    "J-2L": dict(token_keep=[0.1, 1.0], prune_keep=[0.6, 1.0], bits=[5, 16]),
    "J-3L": dict(token_keep=[0.1, 0.6, 1.0], prune_keep=[0.4, 0.8, 1.0], bits=[5, 7, 16]),
    "J-FL": dict(token_keep=[round(0.1 * i, 1) for i in range(1, 11)],
                 prune_keep=[round(0.4 + 0.05 * i, 2) for i in range(13)], bits=list(range(5, 17))),
    "AV_V": dict(token_keep=[0.1, 0.4, 0.7, 1.0], prune_keep=[0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], bits=list(range(5, 17))),
    # our default (sol train's): close levels, where mixing levels can pay on small models (headroom-study.md)
    "default": dict(token_keep=[0.25, 0.5, 1.0], prune_keep=[0.5, 0.625, 0.75, 0.875, 1.0], bits=[5, 6, 7, 8, 16]),
}


def grid_from(spec) -> ActionGrid:
    """An ActionGrid from a grid name (``J-3L``) or a dict of per-axis levels."""
    if isinstance(spec, str):
        if spec not in GRIDS:
            raise SolError(f"unknown action grid '{spec}': use one of {', '.join(GRIDS)} or a dict of levels")
        spec = GRIDS[spec]
    return ActionGrid.from_config(dict(spec))


# --------------------------------------------------------------------------------------------------------------------
# Per-row action primitives (vectorised over a batch of rows; each row may carry its own level)
# --------------------------------------------------------------------------------------------------------------------

def fake_quant(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token absmax fake quantisation of ``x[B, ..., D]`` to ``bits[B]`` bits (>= 16: identity).

    Written as round(x/absmax·qmax)/qmax·absmax so that all-zero rows stay zero and huge values never overflow.
    """
    if bool((bits >= DENSE_BITS).all()):
        return x
    shape = (-1,) + (1,) * (x.dim() - 1)
    qmax = (2.0 ** (bits.to(torch.float32) - 1) - 1).clamp_min(1.0).view(shape)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(xf / absmax * qmax).clamp(-qmax, qmax) / qmax * absmax
    return torch.where((bits >= DENSE_BITS).view(shape), x, q.to(x.dtype))


def n_kept_channels(prune_keep: float, dim: int) -> int:
    return min(dim, max(1, math.ceil(prune_keep * dim - 1e-6)))


def n_budget_tokens(token_keep: float, kv_len: int) -> int:
    return min(kv_len, max(0, math.ceil(token_keep * kv_len - 1e-6)))


def token_layout(token_keep: float, kv_len: int, s: ActionSettings) -> tuple[int, int, int]:
    """(forced sinks, forced window, number of selected pages or recent tokens) for one row at key length kv_len.

    The budget ⌈κ·K⌉ counts all K tokens; forced sinks/window are paid from it first and the rest buys pages (quest)
    or older recent tokens (recency). Pages are aligned at position 0 and clipped to the middle region
    [sinks, K − window), so a selected page may hold fewer than ``page_size`` candidate tokens.
    """
    sinks = min(s.forced_sinks, kv_len)
    window = min(s.forced_window, kv_len - sinks)
    middle = kv_len - sinks - window
    rest = max(0, n_budget_tokens(token_keep, kv_len) - sinks - window)
    if s.criterion == "recency":
        if s.faithful:  # the reference: sinks + window + current always, ⌈κ·n_old⌉ older recent tokens
            sinks, window = min(s.sinks, kv_len), min(s.window + 1, kv_len - min(s.sinks, kv_len))
            middle = kv_len - sinks - window
            return sinks, window, min(middle, math.ceil(token_keep * middle - 1e-9))
        return sinks, window, min(middle, rest)
    n_pages_mid = _n_middle_pages(kv_len, sinks, window, s.page_size)
    if n_budget_tokens(token_keep, kv_len) >= kv_len:
        return sinks, window, n_pages_mid  # the budget covers every key: dense
    want = math.ceil(rest / s.page_size) if rest > 0 else 0
    if s.faithful and want == 0:
        want = 1  # the reference keeps at least one page (its fallback keeps the last allowed token)
    return sinks, window, min(want, n_pages_mid)


def _n_middle_pages(kv_len: int, sinks: int, window: int, page: int) -> int:
    lo, hi = sinks, kv_len - window
    if hi <= lo:
        return 0
    return (hi - 1) // page - lo // page + 1


def keeps_all(token_keep: float, kv_len: int, s: ActionSettings) -> bool:
    """True when the token action keeps every key (attention then runs dense, with no selection overhead)."""
    if token_keep >= 1.0:
        return True
    sinks, window, n = token_layout(token_keep, kv_len, s)
    if s.criterion == "recency":
        return sinks + window + n >= kv_len
    return n >= _n_middle_pages(kv_len, sinks, window, s.page_size)  # clipped pages tile the middle exactly


def select_tokens(q: torch.Tensor, keys: torch.Tensor, kv_len: int, token_keep: float, s: ActionSettings,
                  meta: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions each query head attends to under one token-keep level, for a group of rows with that level.

    q: [B, Hq, hd] (post-RoPE query of the current token); keys: [B, Hkv, >=kv_len, hd] (post-RoPE key cache, the
    current token included). Returns ``index [B, Hq, N]`` (long, key positions) and ``valid [B, Hq, N]`` (bool); N is
    the same for every row of the group, so a kernel can gather exactly N keys per head.
    ``meta``: per-page key (max, min) [B, Hkv, P, hd] of complete pages 0..P−1 (``KVCache.page_meta``); candidate
    pages it covers are scored from it instead of from the keys (the same numbers, without reading every key).
    """
    B, Hq, hd = q.shape
    Hkv = keys.shape[1]
    dev = q.device
    sinks, window, n = token_layout(token_keep, kv_len, s)
    forced = torch.cat([torch.arange(sinks, device=dev), torch.arange(kv_len - window, kv_len, device=dev)])
    if s.criterion == "recency":
        lo = kv_len - window - n
        idx = torch.cat([forced, torch.arange(lo, kv_len - window, device=dev)]).sort().values
        idx = idx.view(1, 1, -1).expand(B, Hq, -1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    page = s.page_size
    lo, hi = sinks, kv_len - window
    first, last = lo // page, (hi - 1) // page
    n_pages = last - first + 1 if hi > lo else 0
    if n == 0 or n_pages == 0:
        idx = forced.view(1, 1, -1).expand(B, Hq, -1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    if meta is not None and last < meta[0].shape[2]:  # kept incrementally by the cache
        kmax, kmin = meta[0][:, :, first:last + 1], meta[1][:, :, first:last + 1]
    else:  # page metadata over the keys of the candidate pages (whole pages; positions >= kv_len are padding)
        span = (last + 1) * page
        k = keys[:, :, first * page: min(span, kv_len)].float()
        pad = span - first * page - k.shape[2]
        if pad:
            k_hi = torch.cat([k, k.new_full((B, Hkv, pad, hd), float("-inf"))], 2)
            k_lo = torch.cat([k, k.new_full((B, Hkv, pad, hd), float("inf"))], 2)
        else:
            k_hi = k_lo = k
        kmax = k_hi.view(B, Hkv, n_pages, page, hd).amax(3)
        kmin = k_lo.view(B, Hkv, n_pages, page, hd).amin(3)
    g = Hq // Hkv
    qg = q.float().view(B, Hkv, g, hd)
    score = qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)  # [B,Hkv,g,P]
    top = _best(score.view(B, Hq, n_pages), n).sort(-1).values                               # [B,Hq,n]
    pos = (top + first).unsqueeze(-1) * page + torch.arange(page, device=dev)            # [B,Hq,n,page]
    valid = (pos >= lo) & (pos < hi)
    pos = pos.clamp(max=kv_len - 1).flatten(2)
    valid = valid.flatten(2)
    idx = torch.cat([forced.view(1, 1, -1).expand(B, Hq, -1), pos], -1)
    valid = torch.cat([torch.ones(B, Hq, forced.numel(), dtype=torch.bool, device=dev), valid], -1)
    return idx, valid


def _best(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores along the last dim, best first; equal scores go to the lower index (a query
    of zeros scores every page 0: the choice must not depend on the batch or on the kernel)."""
    return score.sort(dim=-1, descending=True, stable=True).indices[..., :n]


def topk_channels(x: torch.Tensor, prune_keep: float) -> torch.Tensor:
    """Indices [B, k] of the k = ⌈ρ·D⌉ largest-|x| channels of x[B, D]."""
    k = n_kept_channels(prune_keep, x.shape[-1])
    return x.abs().topk(k, dim=-1, sorted=False).indices


def quest_pages(token_keep: list[float], kv_lens: list[int], s: ActionSettings) -> list[int]:
    """Pages each query selects (``token_layout``), one per (level, key length) pair; a level that keeps every key
    selects every candidate page (with the forced sinks and window that is every key, i.e. dense)."""
    out, memo = [], {}
    for t, n in zip(token_keep, kv_lens):
        if (t, n) not in memo:
            sinks, window, k = token_layout(t, n, s)
            memo[(t, n)] = _n_middle_pages(n, sinks, window, s.page_size) if keeps_all(t, n, s) else k
        out.append(memo[(t, n)])
    return out


def quest_mask(q: torch.Tensor, keys: torch.Tensor, pos: int, n_pages: torch.Tensor, s: ActionSettings,
               alternatives: bool = False, meta: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Which keys each query attends to under QUEST, for T consecutive queries at once (no left padding).

    q: [B, Hq, T, hd] queries at positions pos..pos+T−1 (query j sees the ``pos + j + 1`` keys before it, itself
    included); keys: [B, Hkv, pos + T, hd]; n_pages: [B, T] pages each query selects (``quest_pages``).
    Returns allowed [B, Hq, T, pos + T] (bool): exactly the keys :func:`select_tokens` returns for each query alone.
    ``alternatives``: the T queries all sit at position ``pos`` (candidate actions for one step,
    ``Engine.step_alternatives``): keys [B, Hkv, ≥ pos, hd] (each query's own key at ``pos`` differs and, with
    window ≥ page_size, never enters a candidate page's metadata), allowed [B, Hq, T, pos + 1].

    Page metadata is computed once for all queries; a candidate page that also holds keys a query cannot see yet
    (possible only when window < page_size) gets that query's own metadata over the keys it sees. ``meta``: the key
    (max, min) [B, Hkv, Pc, hd] of the first Pc complete pages, already kept (``KVCache.page_meta``); only the keys
    after them are summarised here (the same values: max and min are exact)."""
    B, Hq, T, hd = q.shape
    Hkv, K = keys.shape[1], pos + (1 if alternatives else T)
    page, dev = s.page_size, q.device
    P = -(-K // page)
    n = [pos + 1] * T if alternatives else [pos + j + 1 for j in range(T)]
    sinks = [min(s.forced_sinks, m) for m in n]
    window = [min(s.forced_window, m - a) for m, a in zip(n, sinks)]
    lo, hi = torch.tensor(sinks, device=dev), torch.tensor([m - w for m, w in zip(n, window)], device=dev)
    done = 0 if meta is None else meta[0].shape[2]  # pages summarised already
    rest = keys[:, :, done * page:K].float()
    fill = (P - done) * page - rest.shape[2]  # alternatives: the own-key slot too (its page is never a candidate)
    k_hi = torch.cat([rest, rest.new_full((B, Hkv, fill, hd), float("-inf"))], 2) if fill else rest
    k_lo = torch.cat([rest, rest.new_full((B, Hkv, fill, hd), float("inf"))], 2) if fill else rest
    kmax = k_hi.view(B, Hkv, P - done, page, hd).amax(3)
    kmin = k_lo.view(B, Hkv, P - done, page, hd).amin(3)
    if done:
        kmax, kmin = torch.cat([meta[0].float(), kmax], 2), torch.cat([meta[1].float(), kmin], 2)
    g = Hq // Hkv
    qg = q.float().reshape(B, Hkv, g * T, hd)
    score = (qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)).view(B, Hq, T, P)
    for j, m in enumerate(n):  # the page holding key m−1 is partial for query j: its metadata stops at key m−1
        p = (m - 1) // page
        if m % page and p <= (m - window[j] - 1) // page:  # (never when window ≥ page_size, as by default)
            seen = keys[:, :, p * page:m].float()
            mx, mn = seen.amax(2), seen.amin(2)  # [B, Hkv, hd]
            qj = qg.view(B, Hkv, g, T, hd)[:, :, :, j]
            score[:, :, j, p] = (qj.clamp(min=0) @ mx[..., None] + qj.clamp(max=0) @ mn[..., None]).reshape(B, Hq)
    page_idx = torch.arange(P, device=dev)
    first, last = lo // page, (hi - 1).div(page, rounding_mode="floor")
    candidate = (page_idx >= first[:, None]) & (page_idx <= last[:, None]) & (hi > lo)[:, None]  # [T, P]
    score = score.masked_fill(~candidate, float("-inf"))
    n_pages = n_pages.to(dev)
    most = int(n_pages.max()) if n_pages.numel() else 0
    chosen = torch.zeros(B, Hq, T, P, dtype=torch.bool, device=dev)
    if most:
        top = _best(score, most)                                                 # [B, Hq, T, most], best first
        chosen.scatter_(-1, top, (torch.arange(most, device=dev) < n_pages[:, None, :, None]).expand_as(top))
    key = torch.arange(K, device=dev)
    middle = (key >= lo[:, None]) & (key < hi[:, None])                          # [T, K]
    forced = (key < lo[:, None]) | ((key >= hi[:, None]) & (key < torch.tensor(n, device=dev)[:, None]))
    return (chosen.index_select(-1, key // page) & middle) | forced

"""A plain-torch decoder over a frozen HF Llama/Qwen2 model's own weights, with per-row efficiency actions.

The HF model is only a weight container: its embedding, norms, projections, rotary embedding and lm_head modules are
called directly, and this module owns the orchestration (KV cache, attention, MLP), so every action is explicit:

* ``extend(ids, cache)`` — dense, causal multi-token forward (prefill, dense refresh). It takes **no action
  argument**: no action state can ever leak into a prefill (the reference's bug §12.1).
* ``step(ids, cache, token_keep, prune_keep, bits)`` — one decode step; each batch row has its own action. With
  ``ids [B, T]`` and actions ``[B, T]``: T consecutive steps in one causal call (actions decided in advance), the same
  maths as T single steps.
  ``mode="simulate"`` masks keys, zeroes channels and fake-quantises over full-size tensors (what the reference
  does); ``mode="compute"`` really does less work: it gathers only the kept KV pages for attention and reads only
  the kept columns of W_gate/W_up (``embedding_bag`` with per-sample weights is a column-sparse GEMV). Both modes
  give the same logits (tests). Activation quantisation is fake in both modes (no integer kernels on CPU); its cost
  is charged bit-weighted by ``sol.cost``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sol.actions import (ActionSettings, fake_quant, keeps_all, quest_mask, quest_pages, select_tokens,
                         topk_channels)
from sol.errors import SolError

MODES = ("simulate", "compute")


class KVCache:
    """Per-layer key/value tensors [B, Hkv, capacity, hd]; every row holds the same number of slots.

    ``pad`` (optional, [B] long) makes a ragged batch: row b's first ``pad[b]`` slots hold no token (left padding).
    Its tokens sit at slots pad[b].. with RoPE positions 0.., and no query ever attends to a pad slot, so a padded
    row computes exactly what it computes alone.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int = 0,
                 pad: torch.Tensor | None = None):
        self.k, self.v, self.pad = k, v, pad
        self._meta: dict[int, list] = {}  # layer → [page size, pages summarised, key max, key min] (page_meta)
        self.length = length

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        """Slots at or beyond the length are scratch that the next write replaces: a rewind forgets the metadata of
        every page that is no longer complete."""
        self._length = value
        for m in self._meta.values():
            m[1] = min(m[1], value // m[0])

    def page_meta(self, layer: int, page: int, n_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-page key max and min [B, Hkv, n_pages, hd] (float32) of layer ``layer``'s pages 0..n_pages−1, whose
        slots must all be written (a step asks after writing its own key): QUEST's page metadata, kept incrementally.
        Pages summarised before are reused, new ones are summarised once, so a decode step reads O(pages) metadata
        instead of every key. Setting a shorter ``length`` forgets the pages it cuts into."""
        m = self._meta.get(layer)
        if m is None or m[0] != page:
            m = self._meta[layer] = [page, 0, None, None]
        done = m[1]
        if m[2] is None or m[2].shape[2] < n_pages:  # grow by doubling
            B, H, _, hd = self.k[layer].shape
            cap = max(n_pages, 2 * (0 if m[2] is None else m[2].shape[2]), 16)
            grow = lambda t: torch.cat([t[:, :, :done], t.new_empty(B, H, cap - done, hd)], 2) if t is not None \
                else self.k[layer].new_empty(B, H, cap, hd, dtype=torch.float32)  # noqa: E731
            m[2], m[3] = grow(m[2]), grow(m[3])
        if n_pages > done:
            keys = self.k[layer][:, :, done * page:n_pages * page].float()
            B, H, _, hd = keys.shape
            keys = keys.view(B, H, n_pages - done, page, hd)
            m[2][:, :, done:n_pages] = keys.amax(3)
            m[3][:, :, done:n_pages] = keys.amin(3)
            m[1] = n_pages
        return m[2][:, :, :n_pages], m[3][:, :, :n_pages]

    @classmethod
    def empty(cls, n_layers, batch, n_kv, head_dim, capacity, dtype, device):
        shape = (batch, n_kv, capacity, head_dim)  # uninitialised: a slot is always written before it is read
        return cls([torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)],
                   [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)])

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Grow the capacity (doubling) so that ``length`` positions fit."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity)
        grow = lambda t: torch.cat([t, t.new_empty(t.shape[:2] + (new - t.shape[2], t.shape[3]))], 2)  # noqa: E731
        self.k = [grow(t) for t in self.k]
        self.v = [grow(t) for t in self.v]

    @classmethod
    def lengths_only(cls, batch: int, length: int, pad: torch.Tensor | None = None) -> "KVCache":
        """A cache that holds no keys, only lengths (``Runtime.rollout(dry=True)``: what a schedule would spend)."""
        none = [torch.empty(batch, 0, 0, 0)]
        return cls(none, none, length, pad)

    def repeat_rows(self, n: int) -> "KVCache":
        """Row r of the result is row r // n of this cache (B blocks → B·n rollout rows)."""
        pad = None if self.pad is None else self.pad.repeat_interleave(n, 0)
        return KVCache([t.repeat_interleave(n, 0) for t in self.k], [t.repeat_interleave(n, 0) for t in self.v],
                       self.length, pad)

    def clone(self) -> "KVCache":
        pad = None if self.pad is None else self.pad.clone()
        return KVCache([t.clone() for t in self.k], [t.clone() for t in self.v], self.length, pad)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows start..stop-1 (writes go to this cache; capacity must already suffice)."""
        return KVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v], self.length,
                       None if self.pad is None else self.pad[start:stop])

    def real_lengths(self, length: int | None = None) -> list[int]:
        """Tokens (not slots) per row at ``length`` slots (default: the current length)."""
        length = self.length if length is None else length
        return [length] * self.batch if self.pad is None else [length - p for p in self.pad.tolist()]


class Engine(nn.Module):
    """Frozen-LM runtime. ``Engine(hf_model, settings, mode)``; see the module docstring."""

    def __init__(self, hf_model, settings: ActionSettings | None = None, mode: str = "simulate"):
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in ("llama", "qwen2"):
            raise SolError(f"unsupported architecture '{cfg.model_type}' for the runtime (llama, qwen2)")
        if getattr(cfg, "use_sliding_window", False):
            raise SolError("Qwen2 sliding-window attention is not supported by the runtime")
        if mode not in MODES:
            raise SolError(f"unknown execution mode '{mode}': use simulate or compute")
        self.hf = hf_model
        self.settings = settings or ActionSettings()
        self.mode = mode
        base = hf_model.model
        self.embed, self.norm, self.rotary, self.lm_head = base.embed_tokens, base.norm, base.rotary_emb, hf_model.lm_head
        self.layers = base.layers
        attn = self.layers[0].self_attn
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.hidden = cfg.hidden_size
        self.mlps = nn.ModuleList(MLPStep(layer.mlp, self) for layer in self.layers)

    @property
    def dtype(self):
        return self.embed.weight.dtype

    @property
    def device(self):
        return self.embed.weight.device

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return KVCache.empty(len(self.layers), batch, self.n_kv, self.head_dim, capacity, self.dtype, self.device)

    # ---------------------------------------------------------------------------------------------------------------
    # Dense multi-token forward (prefill and dense refresh)
    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``ids [B, T]`` densely to ``cache``; return (logits [B, T, V], final hidden [B, T, D]), or only the
        last position's ([B, 1, ·]) with ``last_only`` (a prefill needs no other: the LM head is skipped for them)."""
        B, T = ids.shape
        start = cache.length
        cache.reserve(start + T)
        x = self.embed(ids)
        cos, sin = self._rope(start, T, B, x, cache.pad)
        allowed = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(start)
        if cache.pad is not None:  # [B,1,T,K]: no pad slot is ever attended to
            allowed = allowed & (torch.arange(start + T, device=ids.device) >= cache.pad.to(ids.device)[:, None]
                                 ).view(B, 1, 1, -1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(a, h, cos, sin)
            cache.k[i][:, :, start:start + T] = k
            cache.v[i][:, :, start:start + T] = v
            keys, vals = self._heads(i, cache.k[i][:, :, :start + T], cache.v[i][:, :, :start + T])
            o = self._attend_dense(q, keys, vals, allowed)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length = start + T
        hidden = self.norm(x[:, -1:] if last_only else x)
        return self.lm_head(hidden), hidden

    # ---------------------------------------------------------------------------------------------------------------
    # One decode step with per-row actions
    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: KVCache, token_keep: torch.Tensor, prune_keep: torch.Tensor,
             bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Process ``ids [B]`` at position ``cache.length`` under row-wise actions ``[B]``; return (logits [B,V],
        hidden [B,D]).

        ``ids [B, T]`` with actions ``[B, T]`` runs T consecutive decode steps as one causal call (teacher forcing
        with the actions decided in advance: ``Controller.open_loop``). Token j attends to the cache and to tokens
        ..j under its own action, and every token's MLP runs under its own action, so this is the same maths as T
        single steps, with the KV cache read once and every GEMM over B·T rows. Returns [B, T, ·]. (``compute``
        mode runs the T steps one by one.)"""
        single = ids.dim() == 1
        if single:
            ids, token_keep, prune_keep, bits = ids[:, None], token_keep[:, None], prune_keep[:, None], bits[:, None]
        B, T = ids.shape
        if self.mode == "compute" and T > 1:
            out = [self.step(ids[:, j], cache, token_keep[:, j], prune_keep[:, j], bits[:, j]) for j in range(T)]
            return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)
        prune_keep, bits = prune_keep.to(self.device).reshape(-1), bits.to(self.device).reshape(-1)
        pos = cache.length
        cache.reserve(pos + T)
        x = self.embed(ids)  # [B,T,D]
        cos, sin = self._rope(pos, T, B, x, cache.pad)
        kv_len = pos + T
        pads = [0] * B if cache.pad is None else cache.pad.tolist()
        levels = _levels(token_keep.t().reshape(-1))  # query j of row b at [j * B + b]
        groups = [_groups([(1.0 if keeps_all(t, pos + j + 1 - p, self.settings) else t, p)
                           for t, p in zip(levels[j * B:(j + 1) * B], pads)], lambda g: g, self.device)
                  for j in range(T)]
        pages = None  # QUEST without padding: every query's key set in one vectorised pass (quest_mask)
        if self.mode == "simulate" and self.settings.criterion == "quest" and not any(pads) and \
                not all(t >= 1.0 for g in groups for t, _ in g):
            pages = torch.tensor(quest_pages(levels, [pos + j + 1 for j in range(T) for _ in range(B)],
                                             self.settings)).view(T, B).t()
        kept_meta = ((self.mode == "compute" or pages is not None) and self.settings.criterion == "quest"
                     and cache.pad is None and any(t < 1.0 for g in groups for t, _ in g))  # QUEST page metadata,
        # kept by the cache (simulate mode: the complete pages of quest_mask's metadata)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(a, layer.input_layernorm(x), cos, sin)
            cache.k[i][:, :, pos:kv_len] = k
            cache.v[i][:, :, pos:kv_len] = v
            keys, vals = self._heads(i, cache.k[i][:, :, :kv_len], cache.v[i][:, :, :kv_len])
            meta = (self._heads(i, *cache.page_meta(i, self.settings.page_size, kv_len // self.settings.page_size))
                    if kept_meta else None)
            o = self._attend_step(q, keys, vals, pos, groups, pages, meta)  # [B,Hq,T,hd]
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            h = layer.post_attention_layernorm(x).reshape(B * T, -1)
            x = x + self.mlps[i](h, prune_keep, bits).view(B, T, -1)
        cache.length = kv_len
        hidden = self.norm(x)
        logits = self.lm_head(hidden)
        return (logits[:, 0], hidden[:, 0]) if single else (logits, hidden)

    def can_step_alternatives(self, cache: KVCache) -> bool:
        """Whether :meth:`step_alternatives` applies to this cache (else probe the candidates one by one)."""
        s = self.settings
        return (self.mode == "simulate" and cache.pad is None and s.criterion == "quest"
                and s.forced_window >= s.page_size)

    @torch.no_grad()
    def step_alternatives(self, ids: torch.Tensor, cache: KVCache, token_keep: torch.Tensor, prune_keep: torch.Tensor,
                          bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C alternative actions for the same decode step, as the rows of one call: ``ids [B]`` at position
        ``cache.length`` under actions ``[B, C]``; returns (logits [B, C, V], hidden [B, C, D]). Candidate c of row b
        computes what ``step(ids, cache, ...)`` computes with row b's action c: its query attends to the cache and to
        its own key only (never to another candidate's), every GEMM runs over B·C rows, and the cache is read, never
        written (the oracles' probes). Simulate mode, no left padding, and with QUEST a forced window of at least one
        page (the page metadata then never holds the step's own key, which differs between candidates)."""
        s = self.settings
        if not self.can_step_alternatives(cache):
            raise ValueError("step_alternatives needs simulate mode, an unpadded cache and QUEST with window >= "
                             "page_size")
        B, C = token_keep.shape
        pos = cache.length
        x = self.embed(ids.to(self.device))[:, None].expand(B, C, -1)
        cos, sin = self._rope(pos, 1, B, x[:, :1])                     # one position, broadcast over the candidates
        levels = _levels(token_keep.reshape(-1))                       # candidate c of row b at [b * C + c]
        dense_attn = all(keeps_all(t, pos + 1, s) for t in levels)
        pages = None if dense_attn else torch.tensor(quest_pages(levels, [pos + 1] * len(levels), s)).view(B, C)
        prune_keep, bits = prune_keep.to(self.device).reshape(-1), bits.to(self.device).reshape(-1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(a, layer.input_layernorm(x), cos, sin)            # [B, H, C, hd]
            keys, vals = self._heads(i, cache.k[i][:, :, :pos], cache.v[i][:, :, :pos])
            k_self, v_self = self._heads(i, k, v)
            Hq, hd, n_kv = q.shape[1], q.shape[3], keys.shape[1]
            g = Hq // n_kv
            qg = q.reshape(B, n_kv, g * C, hd)
            s_cache = (qg @ keys.transpose(-1, -2)).view(B, Hq, C, pos)
            s_self = (q.view(B, n_kv, g, C, hd) * k_self[:, :, None]).sum(-1).view(B, Hq, C, 1)
            scores = torch.cat([s_cache, s_self], -1) * self.scaling               # [B, H, C, pos + 1]
            if pages is not None:
                allowed = quest_mask(q, keys, pos, pages, s, alternatives=True)  # the cache's keys suffice
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            p = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            o = (p[..., :pos].reshape(B, n_kv, g * C, pos) @ vals).view(B, Hq, C, hd)
            o = o + p[..., pos:] * v_self.view(B, n_kv, 1, C, hd).expand(B, n_kv, g, C, hd).reshape(B, Hq, C, hd)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, C, -1))
            h = layer.post_attention_layernorm(x).reshape(B * C, -1)
            x = x + self.mlps[i](h, prune_keep, bits).view(B, C, -1)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden

    # ---------------------------------------------------------------------------------------------------------------
    def _rope(self, start, T, B, x, pad=None):
        pos = torch.arange(start, start + T, device=x.device).unsqueeze(0).expand(B, -1)
        if pad is not None:
            pos = (pos - pad.to(x.device)[:, None]).clamp(min=0)
        return self.rotary(x, pos)

    def _qkv(self, a, h, cos, sin):
        B, T, _ = h.shape
        q = a.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # fewer heads after head pruning
        k = a.k_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _heads(self, i, keys, vals):
        """After head pruning (``baselines.heads``) layer i keeps an irregular subset of query heads: give each kept
        head its own view of its KV head. Unpruned models pass through untouched (GQA by reshape)."""
        kv_map = getattr(self.hf, "sol_kv_map", None)
        if kv_map is None:
            return keys, vals
        return keys.index_select(1, kv_map[i]), vals.index_select(1, kv_map[i])

    def _attend_dense(self, q, keys, vals, allowed):
        """q [B,Hq,T,hd], keys/vals [B,Hkv,K,hd], allowed [T,K] or [B,Hq,T,K] bool → [B,Hq,T,hd] (eager maths)."""
        B, Hq, T, hd = q.shape
        n_kv = keys.shape[1]
        g = Hq // n_kv
        qg = q.reshape(B, n_kv, g * T, hd)
        s = (qg @ keys.transpose(-1, -2)).view(B, Hq, T, -1) * self.scaling
        if allowed is not None:
            s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        p = s.softmax(-1, dtype=torch.float32).to(q.dtype)
        return (p.view(B, n_kv, g * T, -1) @ vals).view(B, Hq, T, hd)

    def _attend_step(self, q, keys, vals, pos, groups, pages=None, meta=None):
        """q [B,Hq,T,hd] for positions pos..pos+T−1; groups[j]: {(token_keep, pad): row indices} of query j;
        pages: [B, T] QUEST pages per query (simulate mode, no padding: one vectorised mask); meta: the cache's
        per-page key (max, min) (compute mode, no padding). Returns [B,Hq,T,hd].
        A row with ``pad`` leading pad slots is computed on its own keys ``[pad:]`` (exactly as if unpadded); query j
        never sees a key past pos + j."""
        B, Hq, T = q.shape[:3]
        kv_len = pos + T
        slot = torch.arange(kv_len, device=q.device)
        causal = slot <= pos + torch.arange(T, device=q.device)[:, None]  # [T, K]
        if all(t >= 1.0 and p == 0 for g in groups for t, p in g):
            return self._attend_dense(q, keys, vals, None if T == 1 else causal)
        if pages is not None:
            return self._attend_dense(q, keys, vals, quest_mask(q, keys, pos, pages, self.settings, meta=meta))
        if self.mode == "simulate":
            allowed = causal.expand(B, Hq, T, kv_len).clone()
            for j, g in enumerate(groups):
                n = pos + j + 1  # keys visible to query j
                for (t, p), rows in g.items():
                    if t < 1.0:
                        idx, valid = select_tokens(q[rows, :, j], keys[rows, :, p:], n - p, t, self.settings)
                        m = torch.zeros(len(rows), Hq, kv_len + 1, dtype=torch.bool, device=q.device)
                        m.scatter_(-1, (idx + p).masked_fill(~valid, kv_len), True)  # invalid slots: a spare column
                        allowed[rows, :, j] = m[..., :kv_len]
                    elif p:
                        allowed[rows, :, j] &= slot >= p
            return self._attend_dense(q, keys, vals, allowed)
        q = q[:, :, 0]  # compute mode: one step (step() runs several one by one)
        out = q.new_empty(q.shape)
        for (t, p), rows in groups[0].items():
            if len(rows) == B:  # one group: views, no copy of the cache (rows are 0..B−1 in order)
                rows = slice(None)
            qr, kr, vr = q[rows], keys[rows, :, p:kv_len], vals[rows, :, p:kv_len]
            if t >= 1.0:
                out[rows] = self._attend_dense(qr.unsqueeze(2), kr, vr, None)[:, :, 0]
                continue
            m = None if meta is None else (meta[0][rows], meta[1][rows])
            idx, valid = select_tokens(qr, kr, kv_len - p, t, self.settings, m)
            b = torch.arange(qr.shape[0], device=q.device).view(-1, 1, 1)
            h = (torch.arange(Hq, device=q.device) // (Hq // kr.shape[1])).view(1, -1, 1)
            k_sel, v_sel = kr[b, h, idx], vr[b, h, idx]                      # [R,Hq,N,hd]: only the kept keys
            s = (k_sel @ qr.unsqueeze(-1)).squeeze(-1) * self.scaling       # [R,Hq,N]
            s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
            p_ = s.softmax(-1, dtype=torch.float32).to(q.dtype)
            out[rows] = (p_.unsqueeze(-2) @ v_sel).squeeze(-2)
        return out.unsqueeze(2)


class MLPStep(nn.Module):
    """One layer's MLP for decode steps, x [N,D] → [N,D] (one row per row and step), under per-row prune keep and
    bits.

    A module of its own so that FLOP counters attribute its work (and its bit-weighting) to ``mlps.<layer>``.
    """

    def __init__(self, mlp, engine: "Engine"):
        super().__init__()
        self.mlp = mlp
        self._engine = [engine]  # not a submodule
        self._gate_up_t = None

    @property
    def settings(self):
        return self._engine[0].settings

    @property
    def mode(self):
        return self._engine[0].mode

    def forward(self, x, prune_keep, bits):
        mlp, s = self.mlp, self.settings
        dense_bits = bool((bits >= 16).all())
        in_bits = bits if not s.faithful else torch.full_like(bits, 16)
        pk = _levels(prune_keep)
        groups = _groups(pk, lambda p: min(p, 1.0), x.device)
        if self.mode == "compute" and any(p < 1.0 for p in groups):
            gu = x.new_empty(x.shape[0], 2 * mlp.gate_proj.out_features)
            for p, rows in groups.items():
                xr = x[rows]
                if p >= 1.0:
                    gu[rows] = torch.cat([mlp.gate_proj(fake_quant(xr, in_bits[rows])),
                                          mlp.up_proj(fake_quant(xr, in_bits[rows]))], -1)
                    continue
                idx = topk_channels(xr, p)                                   # [R,k]
                xs = fake_quant(xr.gather(-1, idx), in_bits[rows])          # only the kept channels
                k = idx.shape[1]
                offsets = torch.arange(0, len(rows) * k, k, device=x.device)
                gu[rows] = F.embedding_bag(idx.flatten(), self._gate_up(), offsets, mode="sum",
                                           per_sample_weights=xs.flatten())
            if mlp.gate_proj.bias is not None:
                gu = gu + torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            g, u = gu.chunk(2, -1)
        else:
            if any(p < 1.0 for p in groups):
                keep = torch.ones_like(x, dtype=torch.bool)
                for p, rows in groups.items():
                    if p < 1.0:
                        keep[rows] = torch.zeros(len(rows), x.shape[1], dtype=torch.bool, device=x.device).scatter_(
                            -1, topk_channels(x[rows], p), True)
                x = x * keep
            xq = x if dense_bits else fake_quant(x, in_bits)
            g, u = mlp.gate_proj(xq), mlp.up_proj(xq)
        h = mlp.act_fn(g) * u
        if not dense_bits and not s.faithful:
            h = fake_quant(h, bits)
        y = mlp.down_proj(h)
        if s.faithful and not dense_bits:
            y = fake_quant(y, bits)
        return y

    def _gate_up(self):
        if self._gate_up_t is None:  # [D, 2I]: row c holds column c of W_gate and W_up, contiguous for the gather
            self._gate_up_t = torch.cat([self.mlp.gate_proj.weight, self.mlp.up_proj.weight], 0).t().contiguous()
        return self._gate_up_t


def _levels(t: torch.Tensor) -> list[float]:
    """Per-row action levels as Python floats, rounded so that float32 storage (0.30000001) cannot change a count."""
    return [round(float(v), 6) for v in t.tolist()]


def _groups(values: list[float], key, device=None) -> dict[float, torch.Tensor]:
    """Row indices grouped by ``key(value)``: rows sharing an action level run together."""
    out: dict[float, list[int]] = {}
    for r, v in enumerate(values):
        out.setdefault(key(v), []).append(r)
    return {k: torch.tensor(rows, device=device) for k, rows in out.items()}


"""The SASRec encoder's keys and values over each session's window, kept between batches.

With a window stride (:func:`recsys.windows.window_length`) a session's window grows by one item per event
until the next window starts, and positions count from the window's start. Attention is causal, so the keys and
values of a window's first ``c`` items are the same function of the same ``c`` items in every batch: kept here,
a window that grew by ``m`` items costs ``m`` positions through the encoder instead of the whole window (≈ 3/4
of ``max_len`` on average). This was the largest cost per event in the consumer.

Entries are checked against what they were computed from (the window's start and items), never trusted, so
an entry that a batch left behind and then abandoned, or another writer's change to a session, only costs a
recomputation. The least recently used sessions are evicted beyond ``capacity``.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.index_rows import index_of
from recsys.model import DeviceModel, SASRecEncoder, feed_forward

__all__ = ["EncoderCache", "WindowRequest"]

#: Positions (rows × the widest row's new items) per encoder call: activations stay in cache, while a batch's
#: one-new-item rows (most of them) go through in a few calls. Rows are sorted by width, so a call pads little.
_POSITIONS = 2048
#: Rows per encoder call at most (each gathers up to T keys and values per block).
_ROWS = 512
#: Slots allocated at first; the slabs double up to ``capacity``.
_FIRST_SLOTS = 64


@dataclass(frozen=True, slots=True)
class WindowRequest:
    """The states after the last ``wanted`` items of a session's window.

    ``start`` is the window's first item's index in the session's whole history (it tells windows apart);
    ``items`` the window's vocabulary indices, oldest first. The state after ``items[:j]`` is the encoder's
    output for the history whose window that is, so one request serves a session's consecutive events.
    """

    key: Hashable
    start: int
    items: list[int]
    wanted: int


@dataclass(slots=True)
class _Entry:
    slot: int
    start: int
    items: list[int]


class EncoderCache:
    """Keys and values of every SASRec block for up to ``capacity`` sessions (8·L·T·D bytes each, 51 KB at the
    default sizes). Thread-safe: one :meth:`encode` runs at a time."""

    def __init__(self, device_model: DeviceModel, capacity: int) -> None:
        encoder = device_model.encoder
        if not isinstance(encoder, SASRecEncoder) or not encoder.from_start:
            raise ValueError("the encoder cache needs a SASRec encoder whose windows have a stride")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._dm = device_model
        self._enc = encoder
        self.capacity = capacity
        cfg = device_model.cfg
        self.dim, self._heads, self._t = cfg.dim, cfg.n_heads, cfg.max_len
        self._layers: list[Any] = list(encoder.blocks.layers)
        self._slots = 0
        self._keys: list[Tensor] = []  # per block: [slots, heads, T, head dim]
        self._values: list[Tensor] = []
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.hits = 0  # positions read from the cache instead of encoded
        self.encoded = 0  # positions encoded

    def __len__(self) -> int:
        return len(self._entries)

    def reserve(self, slots: int | None = None) -> None:
        """Allocate the slabs for ``slots`` sessions (default and at most ``capacity``) now. Growing them as
        sessions come copies them each time they double (~140 ms at the last doubling to 4,096 sessions,
        measured): a long-running consumer reserves ahead of its first batch instead."""
        want = self.capacity if slots is None else min(slots, self.capacity)
        with self._lock:
            if self._slots < want:
                self._grow(want)

    @torch.inference_mode()
    def encode(self, requests: Sequence[WindowRequest]) -> Tensor:
        """States [Σ wanted, D]: each request's ``wanted`` states in item order, requests in order.

        Requests for the same key are taken in order (a session's second window in a batch starts after its
        first), so a key may appear more than once.
        """
        out = torch.empty(sum(r.wanted for r in requests), self.dim)
        offsets: list[int] = []
        total = 0
        for r in requests:
            if not 1 <= r.wanted <= len(r.items) <= self._t:
                raise ValueError(f"request for {r.key!r}: wanted {r.wanted} of a {len(r.items)}-item window")
            offsets.append(total)
            total += r.wanted
        # rounds: a key's n-th request goes in round n, so no slot is written twice in one round
        rounds: list[list[int]] = []
        seen: dict[Hashable, int] = {}
        for n, r in enumerate(requests):
            k = seen.get(r.key, 0)
            seen[r.key] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(n)
        with self._lock:
            for members in rounds:
                # at most `capacity` sessions at once: the ones being encoded must not evict each other
                for lo in range(0, len(members), self.capacity):
                    self._round([requests[n] for n in members[lo : lo + self.capacity]], out, offsets, members[lo:])
        return out

    # -------------------------------------------------------------------------------------------------- internals
    def _round(self, reqs: list[WindowRequest], out: Tensor, offsets: list[int], members: list[int]) -> None:
        slots: list[int] = []
        cached: list[int] = []
        for r in reqs:  # touch the cached ones first, so the evictions below spare them
            entry = self._entries.get(r.key)
            if entry is not None:
                self._entries.move_to_end(r.key)
        for r in reqs:
            entry = self._entries.get(r.key)
            keep = 0
            if entry is not None and entry.start == r.start:
                keep = min(len(entry.items), len(r.items) - r.wanted)
                if entry.items[:keep] != r.items[:keep]:
                    keep = 0
            if entry is None:
                entry = self._entries[r.key] = _Entry(self._slot(), r.start, [])
            entry.start, entry.items = r.start, list(r.items)
            slots.append(entry.slot)
            cached.append(keep)
        need = [len(r.items) - c for r, c in zip(reqs, cached, strict=True)]
        self.hits += sum(cached)
        self.encoded += sum(need)
        order = sorted(range(len(reqs)), key=need.__getitem__)
        try:
            for rows in _chunks(order, need):
                states = self._extend(
                    [slots[j] for j in rows], [cached[j] for j in rows], [reqs[j].items for j in rows], need[rows[-1]]
                )
                # each row's last `wanted` states, to where its request's states go: one gather, one scatter
                src_row: list[int] = []
                src_col: list[int] = []
                dst: list[int] = []
                for b, j in enumerate(rows):
                    wanted, m, at = reqs[j].wanted, need[j], offsets[members[j]]
                    src_row += [b] * wanted
                    src_col += range(m - wanted, m)
                    dst += range(at, at + wanted)
                out[index_of(dst)] = states[index_of(src_row), index_of(src_col)]
        except BaseException:
            for r in reqs:  # their slots may be half written: forget them
                entry = self._entries.pop(r.key, None)
                if entry is not None:
                    self._free.append(entry.slot)
            raise

    def _slot(self) -> int:
        if not self._free:
            if self._slots < self.capacity:
                self._grow(min(self.capacity, max(_FIRST_SLOTS, 2 * self._slots)))
            else:
                _, evicted = self._entries.popitem(last=False)
                self._free.append(evicted.slot)
        return self._free.pop()

    def _grow(self, slots: int) -> None:
        extra = slots - self._slots
        for store in (self._keys, self._values):
            fresh = [torch.zeros(extra, self._heads, self._t, self.dim // self._heads) for _ in self._layers]
            if store:
                store[:] = [torch.cat([old, new]) for old, new in zip(store, fresh, strict=True)]
            else:
                store.extend(fresh)
        self._free.extend(range(slots - 1, self._slots - 1, -1))
        self._slots = slots

    def _extend(self, slots: list[int], cached: list[int], windows: list[list[int]], width: int) -> Tensor:
        """Encode positions ``cached[b]`` onwards of each window into its slot; states [B, width, D] of those
        positions (row b's first ``len(windows[b]) - cached[b]`` are real)."""
        b = len(slots)
        dim, heads, hd, t = self.dim, self._heads, self.dim // self._heads, self._t
        need = [len(w) - c for w, c in zip(windows, cached, strict=True)]
        first = index_of(cached)
        positions = first[:, None] + torch.arange(width)  # [B, width]: each new item's position in its window
        real = torch.arange(width) < index_of(need)[:, None]
        rows_real, cols_real = real.nonzero(as_tuple=True)  # row-major: the new items in window order
        new_items = itertools.chain.from_iterable(w[c:] for w, c in zip(windows, cached, strict=True))
        ids = torch.zeros(b, width, dtype=torch.long)
        ids[rows_real, cols_real] = index_of(new_items, sum(need))
        slot_t = index_of(slots)
        # where the new keys and values go, in a slab seen as [slots × heads × T, head dim] rows
        write = (
            (slot_t[rows_real, None] * heads + torch.arange(heads)) * t + positions[rows_real, cols_real, None]
        ).flatten()
        keys = max(len(w) for w in windows)
        # query i of row b sees the window's keys 0 .. cached[b] + i (causal; cached ones included)
        hidden = (torch.arange(keys)[None, None, :] > positions[:, :, None]).unsqueeze(1)  # [B, 1, width, keys]

        emb = F.embedding(ids, self._dm.items.weight)
        x = torch.addcmul(F.embedding(positions.clamp(max=t - 1), self._enc.pos), emb, emb.new_tensor(math.sqrt(dim)))
        for n, layer in enumerate(self._layers):
            sa = layer.self_attn
            h = F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            qkv = F.linear(h, sa.in_proj_weight, sa.in_proj_bias).view(b, width, 3, heads, hd)
            kv = []
            for slab, new in ((self._keys[n], qkv[:, :, 1]), (self._values[n], qkv[:, :, 2])):
                slab.view(-1, hd).index_copy_(0, write, new[rows_real, cols_real].reshape(-1, hd))
                # [B, heads, keys, head dim]: only the positions read are copied (windows are often shorter than T)
                kv.append(slab[:, :, :keys].index_select(0, slot_t))
            # attention written out: for a query or two per row it beat the fused kernel several times over
            scores = torch.matmul(qkv[:, :, 0].transpose(1, 2), kv[0].transpose(-1, -2)).mul_(hd**-0.5)
            o = torch.matmul(torch.softmax(scores.masked_fill_(hidden, float("-inf")), -1), kv[1])
            x = x + F.linear(o.transpose(1, 2).reshape(b, width, dim), sa.out_proj.weight, sa.out_proj.bias)
            x = x + feed_forward(layer, x)
        norm = self._enc.norm
        return F.layer_norm(x, (dim,), norm.weight, norm.bias, norm.eps)


def _chunks(order: list[int], need: list[int]) -> list[list[int]]:
    """``order`` (sorted by ``need``) cut into encoder calls of at most :data:`_POSITIONS` padded positions."""
    out: list[list[int]] = []
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < _ROWS and (hi + 1 - lo) * need[order[hi]] <= _POSITIONS:
            hi += 1
        out.append(order[lo:hi])
        lo = hi
    return out

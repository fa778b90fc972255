"""The session's whole history as compact item counts, and the device model's repeat part (RepeatNet-like).

Where people choose the same items again, the strongest simple signal is how often and how recently the session
chose each item, over its WHOLE history, not only the encoder's window. A session keeps at most ``size`` entries
``(item, count, last)`` (``last`` = the index of its latest occurrence among the session's events); a new item
always gets in, evicting the entry with the fewest occurrences, the oldest among equals (most frequent and most
recent items are kept). Offline (:func:`repeat_features`) and online (:class:`RepeatCounts`, stored with the
session row) run this same rule, so both see the same entries.

Each entry also keeps decayed counts ``Σ_occurrences γ^(age − 1)`` for a short and a long memory (γ in
:data:`DECAYS`): how often AND how lately, which count and latest age alone cannot tell apart (an item chosen 3 times
long ago and once just now against one chosen 4 times in a row). They are updated exactly at each occurrence and
read lazily, so an entry costs O(1) per event.

The model reads ``(item, count, age, decayed_short, decayed_long)`` rows, float32 [B, R, ENTRY_WIDTH] (age = events
since the latest occurrence, 1 = the previous event; item 0 = an empty entry; item codes are exact below 2^24),
most frequent then most recent first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPEAT_SIZE = 64  # entries a session keeps (the default of ``persona train``)
DECAYS = (0.8, 0.97)  # the decayed counts' memories: about 5 and 33 events
ENTRY_WIDTH = 3 + len(DECAYS)
PAD, UNK = 0, 1  # as recsys.model

K = TypeVar("K")


class RepeatCounts(Generic[K]):
    """One session's bounded item counts: ``add`` each event in order, read :meth:`entries`.

    Keys are whatever identifies an item (ids online, integer codes offline); ``n`` counts every event added.
    """

    __slots__ = ("counts", "decayed", "last", "n", "size")

    def __init__(self, size: int = REPEAT_SIZE) -> None:
        self.size = size
        self.counts: dict[K, int] = {}
        self.last: dict[K, int] = {}
        self.decayed: dict[K, list[float]] = {}  # Σ γ^(last − position) per γ, as of the latest occurrence
        self.n = 0

    def add(self, item: K) -> None:
        count = self.counts.get(item)
        if count is None:
            if len(self.counts) >= self.size:
                # fewest occurrences first, then the oldest latest occurrence: the most frequent and recent stay
                out = min(self.counts, key=lambda k: (self.counts[k], self.last[k]))
                del self.counts[out], self.last[out], self.decayed[out]
            self.counts[item] = 1
            self.decayed[item] = [1.0] * len(DECAYS)
        else:
            self.counts[item] = count + 1
            gap = self.n - self.last[item]
            self.decayed[item] = [d * g**gap + 1.0 for d, g in zip(self.decayed[item], DECAYS, strict=True)]
        self.last[item] = self.n
        self.n += 1

    def _order(self) -> list[K]:
        return sorted(self.counts, key=lambda k: (-self.counts[k], -self.last[k]))

    def entries(self) -> list[tuple[K, int, int, list[float]]]:
        """``(item, count, age, decayed)`` most frequent, then most recent first; age = events since its latest
        occurrence, decayed = ``Σ_occurrences γ^(age − 1)`` per γ of :data:`DECAYS`."""
        out = []
        for k in self._order():
            age = self.n - self.last[k]
            out.append(
                (k, self.counts[k], age, [d * g ** (age - 1) for d, g in zip(self.decayed[k], DECAYS, strict=True)])
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """The stored form: ``{"n": events, "items": [[item, count, last, decayed...], ...]}`` (most frequent
        first; decayed as of the latest occurrence)."""
        return {"n": self.n, "items": [[k, self.counts[k], self.last[k], *self.decayed[k]] for k in self._order()]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, size: int = REPEAT_SIZE) -> RepeatCounts[Any]:
        out: RepeatCounts[Any] = cls(size)
        if data:
            out.n = int(data.get("n", 0))
            for item, count, last, *decayed in data.get("items", [])[:size]:
                out.counts[item] = int(count)
                out.last[item] = int(last)
                out.decayed[item] = [float(d) for d in decayed] if len(decayed) == len(DECAYS) else [1.0] * len(DECAYS)
        return out

    @classmethod
    def of(cls, items: Iterable[K], size: int = REPEAT_SIZE) -> RepeatCounts[K]:
        out: RepeatCounts[K] = cls(size)
        for item in items:
            out.add(item)
        return out


def encode_entries(entries: Sequence[tuple[int, int, int, list[float]]], size: int) -> np.ndarray:
    """``(code, count, age, decayed)`` entries → float32 [size, ENTRY_WIDTH], unknown items (code <= UNK) dropped,
    empty rows 0."""
    out = np.zeros((size, ENTRY_WIDTH), dtype=np.float32)
    j = 0
    for code, count, age, decayed in entries:
        if code > UNK and j < size:
            out[j] = (code, count, age, *decayed)
            j += 1
    return out


def repeat_features(codes: np.ndarray, starts: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """The counts each example's session holds before its target: float32 [M, size, ENTRY_WIDTH] (see
    :func:`encode_entries`).

    ``codes`` are vocabulary codes, per-user ordered as in :func:`recsys.splits.make_split`; ``pos`` [M] are example
    positions, ``starts`` [M] their user block's start. Items the vocabulary does not know (UNK) are not counted,
    as the live stream does not apply them to a session. One pass over each user's events (the rule of
    :class:`RepeatCounts`).
    """
    out = np.zeros((pos.size, size, ENTRY_WIDTH), dtype=np.float32)
    by_start: dict[int, list[int]] = {}
    for j, s in enumerate(starts.tolist()):
        by_start.setdefault(s, []).append(j)
    for start, rows in by_start.items():
        rows.sort(key=lambda j: int(pos[j]))
        state: RepeatCounts[int] = RepeatCounts(size)
        at = start
        for j in rows:
            p = int(pos[j])
            while at < p:
                code = int(codes[at])
                if code > UNK:
                    state.add(code)
                at += 1
            out[j] = encode_entries(state.entries(), size)
    return out


def entries_tensor(rows: Sequence[np.ndarray]) -> Tensor:
    """Stacked per-session entries [B, R, ENTRY_WIDTH] (float32) for the model."""
    return torch.from_numpy(np.stack(rows))


class RepeatPart(nn.Module):
    """Repeat or explore, as a mixture (RepeatNet, AAAI 2019), in an additive form that keeps ranking cheap.

    With the edited head output ``x`` [B, D] (so an edit moves it), the explore logits ``s_i = <x, t(E_i)>`` and
    the session's entries j = (item i_j, count, age):

    - repeat distribution over the session's items: ``log P_r(j) = log_softmax_j(<W_q x, t(E_ij)>/√D + f(count, age))``
      with ``f`` a small MLP of log1p(count), log(age), 1/age, the count's share and the decayed counts;
    - the gate ``ρ = w·[x, log1p(#entries), log1p(Σ count)] + b``;
    - item i's score ``log(exp(s_i) + exp(ρ + log P_r(i)))``: a mixture of the explore softmax and the repeat
      distribution with ``p(repeat) = e^ρ / (e^ρ + Σ_i e^{s_i})``, up to a per-session constant.

    That score is ``s_i + softplus(ρ + log P_r(i) − s_i)`` for the session's items and ``s_i`` for every other item:
    a bias on at most R items, added like the group bias (full scan or index).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.features = nn.Sequential(nn.Linear(4 + len(DECAYS), 16), nn.Tanh(), nn.Linear(16, 1))
        self.gate = nn.Linear(dim + 2, 1)
        with torch.no_grad():
            self.query.weight.mul_(0.1)
            self.gate.bias.fill_(0.0)

    def forward(self, x: Tensor, targets: Tensor, entries: Tensor) -> tuple[Tensor, Tensor]:
        """(items [B, R], bias [B, R]) for head outputs x [B, D], item targets t(E) [N, D], entries [B, R, W].

        Empty entries (item 0) get bias 0, so adding the bias at item 0 (padding) changes nothing ranked.
        """
        items = entries[..., 0].long()
        count = entries[..., 1].to(x.dtype)
        age = entries[..., 2].to(x.dtype).clamp(min=1.0)
        real = items > UNK
        t = F.embedding(items, targets)  # [B, R, D]
        s = (t * x.unsqueeze(1)).sum(-1)  # the explore logits of the session's items
        att = (t * self.query(x).unsqueeze(1)).sum(-1) / math.sqrt(x.shape[-1])
        total = count.sum(1, keepdim=True)
        decayed = entries[..., 3 : 3 + len(DECAYS)].to(x.dtype)
        phi = torch.cat(
            [torch.stack([torch.log1p(count), torch.log(age), 1.0 / age, count / total.clamp(min=1.0)], -1), decayed],
            -1,
        )
        logits = (att + self.features(phi).squeeze(-1)).masked_fill(~real, -1e4)
        log_p = torch.log_softmax(logits, 1)
        summary = torch.cat([x, torch.log1p(real.sum(1, keepdim=True).to(x.dtype)), torch.log1p(total)], 1)
        rho = self.gate(summary)  # [B, 1]
        bias = F.softplus(rho + log_p - s)
        return items, torch.where(real, bias, torch.zeros_like(bias))


def add_repeat_bias(scores: Tensor, items: Tensor, bias: Tensor) -> Tensor:
    """``scores`` [B, N] with each session's repeat bias added at its items (out of place)."""
    return scores.scatter_add(1, items, bias)

"""The session's whole history as compact item counts, and the device model's repeat part (RepeatNet-like).

Where people choose the same items again, the strongest simple signal is how often and how recently the session
chose each item, over its WHOLE history, not only the encoder's window. A session keeps at most ``size`` entries
``(item, count, last)`` (``last`` = the index of its latest occurrence among the session's events); a new item
always gets in, evicting the entry with the fewest occurrences, the oldest among equals (most frequent and most
recent items are kept). Offline (:func:`repeat_features`) and online (:class:`RepeatCounts`, stored with the
session row) run this same rule, so both see the same entries.

The model reads them as ``(item, count, age)`` triples, int [B, R, 3] (age = events since the latest occurrence,
1 = the previous event; item 0 = an empty entry), most frequent then most recent first.
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
PAD, UNK = 0, 1  # as recsys.model

K = TypeVar("K")


class RepeatCounts(Generic[K]):
    """One session's bounded item counts: ``add`` each event in order, read :meth:`entries`.

    Keys are whatever identifies an item (ids online, integer codes offline); ``n`` counts every event added.
    """

    __slots__ = ("counts", "last", "n", "size")

    def __init__(self, size: int = REPEAT_SIZE) -> None:
        self.size = size
        self.counts: dict[K, int] = {}
        self.last: dict[K, int] = {}
        self.n = 0

    def add(self, item: K) -> None:
        if item not in self.counts and len(self.counts) >= self.size:
            # fewest occurrences first, then the oldest latest occurrence: keeps the most frequent and most recent
            out = min(self.counts, key=lambda k: (self.counts[k], self.last[k]))
            del self.counts[out], self.last[out]
        self.counts[item] = self.counts.get(item, 0) + 1
        self.last[item] = self.n
        self.n += 1

    def entries(self) -> list[tuple[K, int, int]]:
        """``(item, count, age)`` most frequent, then most recent first; age = events since its latest occurrence."""
        order = sorted(self.counts, key=lambda k: (-self.counts[k], -self.last[k]))
        return [(k, self.counts[k], self.n - self.last[k]) for k in order]

    def to_json(self) -> dict[str, Any]:
        """The stored form: ``{"n": events, "items": [[item, count, last], ...]}`` (most frequent first)."""
        order = sorted(self.counts, key=lambda k: (-self.counts[k], -self.last[k]))
        return {"n": self.n, "items": [[k, self.counts[k], self.last[k]] for k in order]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, size: int = REPEAT_SIZE) -> RepeatCounts[Any]:
        out: RepeatCounts[Any] = cls(size)
        if data:
            out.n = int(data.get("n", 0))
            for item, count, last in data.get("items", [])[:size]:
                out.counts[item] = int(count)
                out.last[item] = int(last)
        return out

    @classmethod
    def of(cls, items: Iterable[K], size: int = REPEAT_SIZE) -> RepeatCounts[K]:
        out: RepeatCounts[K] = cls(size)
        for item in items:
            out.add(item)
        return out


def encode_entries(entries: Sequence[tuple[int, int, int]], size: int) -> np.ndarray:
    """``(code, count, age)`` entries → int32 [size, 3], unknown items (code <= UNK) dropped, empty rows 0."""
    out = np.zeros((size, 3), dtype=np.int32)
    j = 0
    for code, count, age in entries:
        if code > UNK and j < size:
            out[j] = (code, count, age)
            j += 1
    return out


def repeat_features(codes: np.ndarray, starts: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """The counts each example's session holds before its target: int32 [M, size, 3] ``(code, count, age)``.

    ``codes`` are vocabulary codes, per-user ordered as in :func:`recsys.splits.make_split`; ``pos`` [M] are example
    positions, ``starts`` [M] their user block's start. Items the vocabulary does not know (UNK) are not counted,
    as the live stream does not apply them to a session. One pass over each user's events (the rule of
    :class:`RepeatCounts`).
    """
    out = np.zeros((pos.size, size, 3), dtype=np.int32)
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
    """Stacked per-session entries [B, R, 3] (int64) for the model."""
    return torch.from_numpy(np.stack(rows)).long()


class RepeatPart(nn.Module):
    """Repeat or explore, as a mixture (RepeatNet, AAAI 2019), in an additive form that keeps ranking cheap.

    With the edited head output ``x`` [B, D] (so an edit moves it), the explore logits ``s_i = <x, t(E_i)>`` and
    the session's entries j = (item i_j, count, age):

    - repeat distribution over the session's items: ``log P_r(j) = log_softmax_j(<W_q x, t(E_ij)>/√D + f(count, age))``
      with ``f`` a small MLP of log1p(count), log(age), 1/age and the count's share;
    - the gate ``ρ = w·[x, log1p(#entries), log1p(Σ count)] + b``;
    - item i's score ``log(exp(s_i) + exp(ρ + log P_r(i)))``: a mixture of the explore softmax and the repeat
      distribution with ``p(repeat) = e^ρ / (e^ρ + Σ_i e^{s_i})``, up to a per-session constant.

    That score is ``s_i + softplus(ρ + log P_r(i) − s_i)`` for the session's items and ``s_i`` for every other item:
    a bias on at most R items, added like the group bias (full scan or index).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.features = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.gate = nn.Linear(dim + 2, 1)
        with torch.no_grad():
            self.query.weight.mul_(0.1)
            self.gate.bias.fill_(0.0)

    def forward(self, x: Tensor, targets: Tensor, entries: Tensor) -> tuple[Tensor, Tensor]:
        """(items [B, R], bias [B, R]) for head outputs x [B, D], item targets t(E) [N, D], entries [B, R, 3].

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
        phi = torch.stack([torch.log1p(count), torch.log(age), 1.0 / age, count / total.clamp(min=1.0)], -1)
        logits = (att + self.features(phi).squeeze(-1)).masked_fill(~real, -1e4)
        log_p = torch.log_softmax(logits, 1)
        summary = torch.cat([x, torch.log1p(real.sum(1, keepdim=True).to(x.dtype)), torch.log1p(total)], 1)
        rho = self.gate(summary)  # [B, 1]
        bias = F.softplus(rho + log_p - s)
        return items, torch.where(real, bias, torch.zeros_like(bias))


def add_repeat_bias(scores: Tensor, items: Tensor, bias: Tensor) -> Tensor:
    """``scores`` [B, N] with each session's repeat bias added at its items (out of place)."""
    return scores.scatter_add(1, items, bias)

"""The repeat part with frozen weights, for serving: a few rows in NumPy, and many prepared rows in few torch calls.

:class:`recsys.repeats.RepeatPart` is the trained module; it runs about thirty tensor operations per call, and at
serving time the number of calls, not the arithmetic, is most of its cost:

- a single ranking scores one row: :meth:`RepeatRows.__call__` runs the same float32 arithmetic in NumPy at the
  row's real entries only (measured: ~30 torch operations, 0.37 ms a ranking, against ~0.03 ms for the explore
  scores themselves);
- the consumer scores every prediction twice (under the edited and the base model), in a few calls per batch:
  :meth:`RepeatRows.prepare` computes once, as a batch's count snapshots are unpacked, what reads the entries alone
  (:class:`PreparedRows`), and :meth:`RepeatRows.score` then costs a dense product, two gathers and six
  element-wise operations per call (measured on a batch of 125 rows and 551 items: 0.14 against 0.29 ms for the
  module on entries whose own terms were computed already).

Both fold the attention term into one key per item at load, ``k_i = W_q^T t(E_i) / √D`` and
``c_i = <b_q, t(E_i)> / √D``, so a row's attention logit is ``<k_i, x> + c_i``. The results agree with the module's
within float32 rounding (tests/test_repeats.py, every form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.index_rows import index_of
from recsys.repeats import DECAYS, DENSE_ITEMS, EMPTY_LOGIT, TINY, UNK, CountsSnapshots, RepeatPart

#: Up to this many rows, online scoring runs the repeat part in NumPy (:meth:`RepeatRows.__call__`).
SMALL_BATCH = 4


@dataclass(frozen=True)
class PreparedRows:
    """Many rows' entries with what reads them alone computed once (:meth:`RepeatRows.prepare`), for scoring them
    under several head outputs (:meth:`RepeatRows.score`). Rows select like a tensor's (``prepared[rows]``)."""

    items: Tensor  # [P, R] int64: each entry's vocabulary code, 0 at empty entries
    empty: Tensor  # [P, R] bool: the empty entries (and items the model does not know)
    logits: Tensor  # [P, R] float32: the repeat logits' terms that read the entries alone, EMPTY_LOGIT at empty ones
    gate: Tensor  # [P] float32: the gate's terms that read the entries alone (their number, total count, bias)

    def __getitem__(self, rows: Any) -> PreparedRows:
        if isinstance(rows, list):  # once for the four tensors (recsys.index_rows)
            rows = index_of(rows)
        return PreparedRows(self.items[rows], self.empty[rows], self.logits[rows], self.gate[rows])

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four arrays (views), for a process boundary; :meth:`from_numpy` is the inverse."""
        return self.items.numpy(), self.empty.numpy(), self.logits.numpy(), self.gate.numpy()

    @classmethod
    def from_numpy(cls, items: np.ndarray, empty: np.ndarray, logits: np.ndarray, gate: np.ndarray) -> PreparedRows:
        return cls(torch.from_numpy(items), torch.from_numpy(empty), torch.from_numpy(logits), torch.from_numpy(gate))


class RepeatRows:
    """:meth:`RepeatPart.forward` with frozen weights, for serving (see the module's docstring)."""

    def __init__(self, part: RepeatPart, targets: Tensor) -> None:
        def arr(t: Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)

        self.mixture = part.mixture
        self.keys: np.ndarray | None = None
        self.key_bias: np.ndarray | None = None
        if part.query is not None:
            with torch.no_grad():
                scale = math.sqrt(targets.shape[1])
                t = targets.detach()
                self.keys = arr(t @ part.query.weight / scale)  # [N, D]: <k_i, x> = <t_i, W_q x> / √D
                self.key_bias = arr(t @ part.query.bias / scale)  # [N]
        first, second = part.features[0], part.features[2]
        assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
        self.w1, self.b1 = arr(first.weight.T), arr(first.bias)
        self.w2, self.b2 = arr(second.weight.T)[:, 0], float(second.bias.detach()[0])
        gate = arr(part.gate.weight[0])
        self.wg, self.wg_entries, self.wg_total = gate[:-2], float(gate[-2]), float(gate[-1])
        self.bg = float(part.gate.bias.detach()[0])
        self.wd = None if part.decay_weight is None else arr(part.decay_weight)

    def __call__(self, x: Tensor, entries: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(items [B, R], bias [B, R]) as :meth:`RepeatPart.forward` for x [B, D], entries [B, R, W] and the
        explore logits [B, N]."""
        xs, e, full = x.numpy(), entries.numpy(), logits.numpy()
        items = e[..., 0].astype(np.int64)
        bias = np.zeros(items.shape, dtype=np.float32)
        for b in range(len(items)):
            real = np.flatnonzero(items[b] > UNK)
            if len(real):
                bias[b, real] = self._row(xs[b], e[b, real], items[b, real], full[b])
        return torch.from_numpy(items), torch.from_numpy(bias)

    def entry_logits(self, e: np.ndarray, total: np.ndarray | np.float32) -> np.ndarray:
        """:meth:`RepeatPart.entry_logits` in NumPy for real entries ``e`` [M, W] whose sessions' total counts are
        ``total`` (one, or one per entry): float32, equal to torch's up to rounding (NumPy's tanh is about seven
        times faster than torch's on this CPU, and it is a third of the consumer's preparation)."""
        f32 = np.float32
        count = e[:, 1]
        age = np.maximum(e[:, 2], f32(1.0))
        decayed = e[:, 3 : 3 + len(DECAYS)]
        phi = np.empty((len(e), self.w1.shape[0]), dtype=np.float32)
        phi[:, 0] = np.log1p(count)
        phi[:, 1] = np.log(age)
        phi[:, 2] = f32(1.0) / age
        phi[:, 3] = count / np.maximum(total, f32(1.0))
        phi[:, 4 : 4 + len(DECAYS)] = decayed
        if self.wd is None:
            return np.tanh(phi @ self.w1 + self.b1) @ self.w2 + f32(self.b2)
        # the mixture forms also read the decayed counts' logs
        log_decayed = np.log(np.maximum(decayed, f32(TINY)))
        phi[:, 4 + len(DECAYS) :] = log_decayed
        z = np.tanh(phi @ self.w1 + self.b1) @ self.w2 + f32(self.b2)
        term = log_decayed[:, 0] * self.wd[0]  # a sum over a short last axis is slow in NumPy: one term at a time
        for j in range(1, len(DECAYS)):
            term += log_decayed[:, j] * self.wd[j]
        return term + z

    def _row(self, x: np.ndarray, e: np.ndarray, items: np.ndarray, full: np.ndarray) -> np.ndarray:
        """One row's bias [M] at its M real entries ``e`` [M, W] (items ``items``), head output x [D], logits [N]."""
        f32 = np.float32
        total = float(e[:, 1].sum())
        z = self.entry_logits(e, f32(total))
        if self.keys is not None and self.key_bias is not None:
            z = z + (self.keys[items] @ x + self.key_bias[items])
        top = float(z.max())
        log_norm = top + math.log(float(np.exp(z - top).sum()))  # log Σ_j exp(z_j): log P_r = z − log_norm
        rho = float(x @ self.wg) + self.wg_entries * math.log1p(len(e)) + self.wg_total * math.log1p(total) + self.bg
        if self.mixture:
            peak = float(full.max())
            rho += peak + math.log(float(np.exp(full - peak).sum()))
        return np.logaddexp(f32(0.0), z - (log_norm - rho) - full[items]).astype(np.float32)

    # -- many rows, scored more than once ----------------------------------------------------------------------

    def prepare(self, snapshots: CountsSnapshots[Any], size: int) -> PreparedRows:
        """:class:`PreparedRows` of many sessions' counts (:meth:`CountsSnapshots.real_entries`, at most ``size``
        entries each), computed on the real entries as they are unpacked, never padded and gathered back out."""
        f32 = np.float32
        n = len(snapshots)
        snap, pos, e = snapshots.real_entries(size)
        items = np.zeros((n, size), dtype=np.int64)
        items[snap, pos] = e[:, 0]
        empty = np.ones((n, size), dtype=bool)
        empty[snap, pos] = False
        # each snapshot's total count over its entries (integers: exact in float32) and number of entries
        total = np.bincount(snap, weights=e[:, 1], minlength=n).astype(f32)
        z = np.full((n, size), EMPTY_LOGIT, dtype=f32)
        if len(e):
            logits = self.entry_logits(e, total[snap])
            if self.key_bias is not None:
                logits += self.key_bias[items[snap, pos]]
            z[snap, pos] = logits
        entries = np.bincount(snap, minlength=n).astype(f32)
        gate = f32(self.wg_entries) * np.log1p(entries) + f32(self.wg_total) * np.log1p(total) + f32(self.bg)
        return PreparedRows.from_numpy(items, empty, z, gate)

    def score(self, x: Tensor, rows: PreparedRows, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(items [P, R], bias [P, R]) as :meth:`RepeatPart.forward` for head outputs x [P, D] and the explore
        logits [P, N] of every item."""
        items = rows.items
        z = rows.logits
        if self.keys is not None:
            keys = torch.from_numpy(self.keys)  # a view: no copy
            if keys.shape[0] <= DENSE_ITEMS:
                att = (x @ keys.T).gather(1, items)  # one dense product costs less than gathering R keys per row
            else:
                att = torch.bmm(F.embedding(items, keys), x.unsqueeze(2)).squeeze(2)
            z = att.add_(z)
        rho = (x @ torch.from_numpy(self.wg)).add_(rows.gate)
        if self.mixture:
            rho += torch.logsumexp(logits, 1)
        term = torch.log_softmax(z, 1).sub_(logits.gather(1, items)).add_(rho.unsqueeze(1))
        return items, F.softplus(term).masked_fill_(rows.empty, 0.0)

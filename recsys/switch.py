"""Online switches for the adapter's edit and the group terms, one pair per prototype (docs/method.md).

Our rule, not the paper's (docs/method.md, "Online switches"). Validation chooses the adapter and the group terms,
but it cannot see a test period on which they stop helping: on the flights log the edit gained on validation and
lost on every later event, so Persona scored 0.99 × its own base model (docs/results.md, "An online switch").
Whoever serves the model scores every event before applying it (the consumer's prequential check, ``persona
evaluate`` in time order), so it can see a term losing as it happens.

Each prototype keeps, per term, a decayed sum of the term's **gain** on its members' events and a decayed count of
those events (γ = :data:`SWITCH_DECAY` per event of the prototype, about its last thousand events):

- the edit's gain: the target's reciprocal rank under the edited model minus under the base model, both with the
  group terms;
- the group terms' gain (prototype counts, fine groups): with them minus without them, on the edited model.

A term is applied while its decayed sum is ≥ 0 (a prototype with no events yet applies both). With the edit off a
session gets the base model (plus the group terms if they are on); the gains are always measured on the full terms,
so a switched-off term comes back once it would win again. Reciprocal rank, not log-likelihood: the group terms
sharpen the top of the ranking and lose likelihood where they raise NDCG@10, so a likelihood switch turns them off
where they help.

The state is a float64 tensor [K, 3] per bank (:data:`EDIT_GAIN`, :data:`GROUP_GAIN` and :data:`EVENTS`, the
decayed count that turns a sum into a mean for reports; the switch needs only the sums' signs), kept in the
bundle's bank (started on the validation period) and in the store's prototype rows (the consumer's updates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from recsys.metrics import target_ranks
from recsys.stored_rows import overlay_stored

#: Per event of a prototype: each switch weighs its last ~1,000 events (γ 0.99 measured 2 % worse on MovieLens-100K,
#: where a few hundred events' reciprocal ranks are too noisy to switch on).
SWITCH_DECAY = 0.999

#: The columns of a bank's switch state [K, SWITCH_WIDTH].
EDIT_GAIN, GROUP_GAIN, EVENTS = range(3)
SWITCH_WIDTH = 3


def neutral_switches(k: int) -> Tensor:
    """The state [K, 3] of a bank that has seen no event: every term on."""
    return torch.zeros(k, SWITCH_WIDTH, dtype=torch.float64)


def terms_on(switches: Tensor | None, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """(edit on, group terms on), bool [B] each, for sessions assigned to ``prototypes`` [B] (-1: none, both on) under
    ``switches`` [K, 3] (``None``: a bank without switches, both on)."""
    if switches is None or switches.shape[0] == 0:
        on = torch.ones(prototypes.shape[0], dtype=torch.bool)
        return on, on
    rows = switches[prototypes.clamp(min=0)]
    none = prototypes < 0
    return (rows[:, EDIT_GAIN] >= 0) | none, (rows[:, GROUP_GAIN] >= 0) | none


class TermRanks(NamedTuple):
    """0-based target ranks [P] under the four combinations of the edit and the group terms."""

    edited_grouped: Tensor
    plain_grouped: Tensor
    edited: Tensor
    plain: Tensor

    @classmethod
    def of(cls, edited: Tensor, plain: Tensor, bias: Tensor | None, targets: Tensor) -> TermRanks:
        """The ranks of ``targets`` [B] under the edited and the plain model's scores [B, N], with and without the
        group terms ``bias`` [B, N] (``None``: the model has none, so both pairs are the same)."""
        e, p = target_ranks(edited, targets), target_ranks(plain, targets)
        if bias is None:
            return cls(e, p, e, p)
        return cls(target_ranks(edited + bias, targets), target_ranks(plain + bias, targets), e, p)

    def served(self, edit_on: Tensor, group_on: Tensor) -> Tensor:
        """The ranks of what is served under the switches [P] (bool each)."""
        grouped = torch.where(edit_on, self.edited_grouped, self.plain_grouped)
        alone = torch.where(edit_on, self.edited, self.plain)
        return torch.where(group_on, grouped, alone)

    def gains(self) -> tuple[Tensor, Tensor]:
        """(the edit's gain, the group terms' gain) [P] float64 in reciprocal rank (see the module docstring)."""
        rr = [1.0 / (r.to(torch.float64) + 1.0) for r in self]
        return rr[0] - rr[1], rr[0] - rr[2]


def switched_scores(edited: Tensor, plain: Tensor, bias: Tensor | None, edit_on: Tensor, group_on: Tensor) -> Tensor:
    """Scores [B, N] as served: the edited or the plain model's scores [B, N] per row, plus the group terms ``bias``
    [B, N] where they are on."""
    scores = torch.where(edit_on[:, None], edited, plain)
    return scores if bias is None else scores + bias * group_on[:, None].to(bias.dtype)


@torch.no_grad()
def update_switches(
    switches: Tensor, prototypes: Tensor, edit_gain: Tensor, group_gain: Tensor, decay: float = SWITCH_DECAY
) -> None:
    """In place, in event order: per prototype k, ``g ← γ g + gain`` for each term and ``n ← γ n + 1`` for each of
    its events (prototypes [P], -1 = none: not counted). O(K') tensor operations per batch (K' = prototypes present)."""
    for k in prototypes.unique().tolist():
        if k < 0:
            continue
        mine = prototypes == k
        m = int(mine.sum())
        weights = torch.pow(decay, torch.arange(m - 1, -1, -1, dtype=torch.float64))
        keep = decay**m
        row = switches[k]
        row[EDIT_GAIN] = row[EDIT_GAIN] * keep + (weights * edit_gain[mine].double()).sum()
        row[GROUP_GAIN] = row[GROUP_GAIN] * keep + (weights * group_gain[mine].double()).sum()
        row[EVENTS] = row[EVENTS] * keep + weights.sum()


def count_terms_on(switches: Tensor) -> tuple[int, int]:
    """How many of the K prototypes apply the edit, and the group terms (a gauge on the dashboard)."""
    edit, group = (int((switches[:, c] >= 0).sum()) for c in (EDIT_GAIN, GROUP_GAIN))
    return edit, group


def describe(switches: Tensor) -> str:
    """One line for logs: how many of the K prototypes apply each term."""
    k = switches.shape[0]
    edit, group = count_terms_on(switches)
    return f"edit on for {edit} of {k} prototypes, group terms on for {group} of {k}"


def switches_to_bytes(row: Tensor) -> bytes:
    """One prototype's switch state [3] as float64 bytes for the store (24 bytes)."""
    return row.detach().to(torch.float64).contiguous().numpy().tobytes()


def stored_switches(stored: Sequence[bytes | None], initial: Tensor) -> Tensor:
    """The bank's switch state [K, 3] from the stored rows' bytes (in prototype order): a row stored before the
    switches were (``None``) keeps the bundle's ``initial`` row. Raises ``ValueError`` for a row of the wrong size."""
    return overlay_stored(initial, stored, _switch_row)


def _switch_row(raw: bytes) -> Tensor:
    if len(raw) != 8 * SWITCH_WIDTH:
        raise ValueError(f"stored switch state has {len(raw)} bytes, expected {8 * SWITCH_WIDTH}")
    return torch.frombuffer(bytearray(raw), dtype=torch.float64)

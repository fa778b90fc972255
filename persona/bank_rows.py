"""The prototype bank between the store's rows and the model's tensors: the consumer reads and writes it, the API
reads it (one decoding, so both serve the same bank)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import torch

from persona.store import PrototypeRow
from recsys.errors import PersonaError
from recsys.online import BankState, OnlineModel, code_from_bytes, code_to_bytes, next_items_to_bytes, stored_next_items
from recsys.switch import stored_switches, switches_to_bytes


def bank_from_rows(rows: Sequence[PrototypeRow], online: OnlineModel) -> BankState:
    """The stored bank as tensors; raises :class:`PersonaError` if it does not fit the model."""
    cfg = online.cfg
    k = online.initial_bank.centres.shape[0]
    if len(rows) != k or [r.prototype_id for r in rows] != list(range(k)):
        raise PersonaError(
            f"the stored prototype bank of model {online.version} has ids {[r.prototype_id for r in rows]}, "
            f"expected 0..{k - 1}",
            "the store and the bundle disagree; re-register the bundle under a new version",
        )
    try:
        centres = torch.stack([code_from_bytes(r.centre, cfg) for r in rows])
        next_items = stored_next_items([r.next_items for r in rows], online.initial_bank.next_items, cfg)
        initial = online.initial_bank.switches
        switches = None if initial is None else stored_switches([r.switches for r in rows], initial)
    except ValueError as exc:
        raise PersonaError(f"the stored prototype bank of model {online.version} is unusable: {exc}") from exc
    counts = torch.tensor([r.count for r in rows], dtype=online.initial_bank.counts.dtype)
    return BankState(centres, counts, max(r.version for r in rows), next_items, switches)


def rows_from_bank(
    bank: BankState, assigned: set[int], previous: Sequence[PrototypeRow], now: datetime, counted: set[int]
) -> list[PrototypeRow]:
    """Rows to upsert: the prototypes that received codes or counted a next item (and its gains, in their switches;
    all of them when the bank is being seeded)."""
    last = {r.prototype_id: r.last_assigned_at for r in previous}
    touched = assigned | counted if previous else set(range(bank.centres.shape[0]))
    group, switches = bank.next_items, bank.switches
    return [
        PrototypeRow(
            prototype_id=k,
            centre=code_to_bytes(bank.centres[k]),
            count=float(bank.counts[k]),
            version=0,
            next_items=None if group is None else next_items_to_bytes(group[k]),
            switches=None if switches is None else switches_to_bytes(switches[k]),
            last_assigned_at=now if k in assigned else last.get(k),  # re-seeded ones count as assigned
            updated_at=now,
        )
        for k in sorted(touched)
    ]

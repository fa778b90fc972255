"""The stored states that predict a batch's first event per session: decoded from their bytes when they were
computed by this model, listed for recomputation when not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from persona.ingest.model_work import EarlyInput
from persona.ingest.plan import Plan, StoredState
from persona.user_state import user_state_payload
from recsys.index_rows import index_of
from recsys.online import BankState, OnlineModel


@dataclass
class Previous:
    """Codes [S, L, d], prototypes [S] and user states [S, D] of stored sessions whose next event is scored.

    ``recompute`` lists the rows whose stored values cannot be used (another model version, rows written before
    user states were stored, sizes that do not fit): the caller fills them in.
    """

    codes: Tensor
    protos: Tensor
    states: Tensor
    recompute: list[int]


def usable_payload(online: OnlineModel, st: StoredState) -> bytes | None:
    """The float32 bytes of a stored state's user state if it can predict with this model, else ``None``."""
    cfg = online.cfg
    code = st.code
    if st.model_version != online.version or code is None or len(code) != 4 * cfg.n_edit_layers * cfg.code_dim:
        return None
    return user_state_payload(st.user_state, st.edit_version, cfg)


def previous_states(online: OnlineModel, bank: BankState, prev: list[tuple[StoredState, list[int]]]) -> Previous:
    cfg = online.cfg
    n_prev, n_protos = len(prev), bank.centres.shape[0]
    usable: list[int] = []
    code_bytes: list[bytes] = []
    state_bytes: list[bytes] = []
    recompute: list[int] = []
    for j, (st, _hist) in enumerate(prev):
        payload = usable_payload(online, st)
        if st.code is None or payload is None:
            recompute.append(j)
            continue
        usable.append(j)
        code_bytes.append(st.code)
        state_bytes.append(payload)
    out = Previous(
        torch.zeros(n_prev, cfg.n_edit_layers, cfg.code_dim),
        torch.zeros(n_prev, dtype=torch.long),
        torch.zeros(n_prev, cfg.dim),
        recompute,
    )
    if not usable:
        return out
    rows = index_of(usable)
    out.codes[rows] = floats(code_bytes).view(len(usable), cfg.n_edit_layers, cfg.code_dim)
    out.states[rows] = floats(state_bytes).view(len(usable), cfg.dim)
    stored_protos = [prev[j][0].prototype_id for j in usable]
    # scored with the edit the API served for it: the stored prototype, while it still exists
    protos = index_of([p if p is not None and 0 <= p < n_protos else -1 for p in stored_protos])
    lost = (protos < 0).nonzero().flatten()
    if len(lost):
        protos[lost] = online.assign(out.codes[rows[lost]], bank)
    out.protos[rows] = protos
    return out


def floats(chunks: list[bytes]) -> Tensor:
    """The float32 values of byte strings laid end to end, as one flat tensor."""
    return torch.from_numpy(np.frombuffer(b"".join(chunks), dtype=np.float32).copy())


def early_input(online: OnlineModel, plan: Plan) -> EarlyInput:
    """The predictions whose previous state was read from the store (not one a pending batch will write): their
    half of the prequential check needs neither this batch's forward nor the bank the commit scores with."""
    which: list[int] = []
    payloads: list[bytes] = []
    for n, (row, _item) in enumerate(plan.pre_rows):
        if row < -1:
            snapshot = plan.stored_prev[-row - 2][0]
            payload = None if snapshot.origin is not None else usable_payload(online, snapshot)
            if payload is not None:
                which.append(n)
                payloads.append(payload)
    if not which:
        return EarlyInput([], torch.empty(0, online.cfg.dim), torch.empty(0, dtype=torch.long))
    states = floats(payloads).view(len(which), online.cfg.dim)
    return EarlyInput(which, states, index_of([plan.pre_rows[n][1] for n in which]))

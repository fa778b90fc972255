"""A session's stored user state: the encoder's output for its history, tagged with the edit version it is for.

The tag is what makes the stored state safe to reuse. A writer that does not know the column (a consumer of
an earlier release during a rolling upgrade) updates a session's history and edit version but leaves the old
state in place; the tag then no longer matches and readers recompute the state from the history instead of
ranking with one that describes an older history.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from recsys.model import ModelConfig
from recsys.online import state_from_bytes, state_to_bytes

_TAG = struct.Struct("<q")


def pack_user_state(state: Tensor, edit_version: int) -> bytes:
    """Bytes for the ``user_state`` column: the edit version (int64) then h [D] as float32."""
    return _TAG.pack(edit_version) + state_to_bytes(state)


def pack_user_states(states: Tensor, edit_versions: Sequence[int]) -> list[bytes]:
    """:func:`pack_user_state` of every row of states [B, D] (one conversion for the batch)."""
    rows = states.detach().to(torch.float32).contiguous().numpy()
    return [_TAG.pack(version) + row.tobytes() for version, row in zip(edit_versions, rows, strict=True)]


def user_state_payload(raw: bytes | None, edit_version: int, cfg: ModelConfig) -> bytes | None:
    """The float32 bytes of the stored h [D], or ``None`` when it is absent, belongs to another edit version, or
    does not fit ``cfg`` (cheap: no tensor is made, so a batch can convert all payloads at once)."""
    if raw is None or len(raw) != _TAG.size + 4 * cfg.dim:
        return None
    (tagged,) = _TAG.unpack_from(raw)
    return raw[_TAG.size :] if tagged == edit_version else None


def unpack_user_state(raw: bytes | None, edit_version: int, cfg: ModelConfig) -> Tensor | None:
    """The stored h [D], or ``None`` when it is absent, belongs to another edit version, or does not fit ``cfg``."""
    payload = user_state_payload(raw, edit_version, cfg)
    return None if payload is None else state_from_bytes(payload, cfg)

"""A session's stored user state: the encoder's output for its history, tagged with the edit version it is for.

The tag is what makes the stored state safe to reuse. A writer that does not know the column (a consumer of
an earlier release during a rolling upgrade) updates a session's history and edit version but leaves the old
state in place; the tag then no longer matches and readers recompute the state from the history instead of
ranking with one that describes an older history.
"""

from __future__ import annotations

import struct

from torch import Tensor

from recsys.model import ModelConfig
from recsys.online import state_from_bytes, state_to_bytes

_TAG = struct.Struct("<q")


def pack_user_state(state: Tensor, edit_version: int) -> bytes:
    """Bytes for the ``user_state`` column: the edit version (int64) then h [D] as float32."""
    return _TAG.pack(edit_version) + state_to_bytes(state)


def unpack_user_state(raw: bytes | None, edit_version: int, cfg: ModelConfig) -> Tensor | None:
    """The stored h [D], or ``None`` when it is absent, belongs to another edit version, or does not fit ``cfg``."""
    if raw is None or len(raw) < _TAG.size:
        return None
    (tagged,) = _TAG.unpack_from(raw)
    if tagged != edit_version:
        return None
    try:
        return state_from_bytes(raw[_TAG.size :], cfg)
    except ValueError:
        return None

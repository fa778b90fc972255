"""Test-only crash points: kill this process at an exact point of a batch's life (the fault suite, issue 13).

``PERSONA_FAULT_POINT=name[:nth]`` arms one point: the ``nth`` time (default 1) the code passes
``maybe_crash(name)``, the process sends itself SIGKILL (no cleanup, no flush: what a power cut or the OOM killer
does). A timer cannot hit "after the store commit, before the Kafka offset commit"; this can, every run.

Safe in production: only this environment variable arms it (not a setting, not the config file), it is read once
when the process first passes a point, an unset variable makes :func:`maybe_crash` one attribute check, and an
armed process says so in a WARNING line at start (:func:`armed`). A name that is not a point is refused (exit 2),
so a typo cannot leave a test silently crash-free.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from recsys.errors import PersonaError

ENV = "PERSONA_FAULT_POINT"

#: Where the consumer can be killed, in the order a batch meets them.
POINTS = (
    "after_poll",  # records polled, nothing of them prepared or applied
    "model_work",  # a batch's model work started (in the model process), its store transaction not begun
    "in_store_transaction",  # everything written inside the batch's transaction, not committed
    "after_store_commit",  # the transaction committed, its dead letters not sent, its offsets not committed
    "dlq_produce",  # a dead letter handed to the producer, not flushed
    "before_offset_commit",  # dead letters flushed, the Kafka offset commit not sent
)

log = logging.getLogger(__name__)
_lock = threading.Lock()
_armed: tuple[str, int] | None = None
_read = False
_passed = 0


def armed() -> tuple[str, int] | None:
    """The armed point and the pass that kills, from the environment (read once); ``None`` when unset."""
    global _armed, _read
    with _lock:
        if not _read:
            _armed, _read = _parse(os.environ.get(ENV, "")), True
            if _armed is not None:
                log.warning("%s=%s: this process will SIGKILL itself at that point (tests only)", ENV, os.environ[ENV])
        return _armed


def _parse(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, nth = value.partition(":")
    if name not in POINTS or (nth and (not nth.isdigit() or int(nth) < 1)):
        raise PersonaError(f"{ENV}={value!r} is not a fault point", f"use name[:nth] with a name among {POINTS}")
    return name, int(nth or 1)


def maybe_crash(point: str) -> None:
    """SIGKILL this process if ``point`` is the armed one and this is its ``nth`` pass; otherwise nothing."""
    if _read and _armed is None:
        return
    target = armed()
    if target is None or target[0] != point:
        return
    global _passed
    with _lock:
        _passed += 1
        if _passed < target[1]:
            return
    os.kill(os.getpid(), signal.SIGKILL)

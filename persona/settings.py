"""One settings object for every process, read from ``PERSONA_*`` environment variables and an optional TOML file.

Precedence (highest first): explicit keyword arguments, environment variables, the TOML file named by
``PERSONA_CONFIG`` (or passed as ``config_file``), then the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.errors import PersonaError


class Settings(BaseSettings):
    """Every knob of the service; each field is ``PERSONA_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PERSONA_", extra="forbid")

    data_dir: Path = Field(Path("data"), description="Where bundles, the SQLite store and caches live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store; default: SQLite file <data_dir>/persona.db."
    )
    model_dir: Path | None = Field(None, description="Model bundle to serve; default: the active registry version.")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    kafka_topic: str = Field("persona.events", description="Topic of interaction events (key = session_id).")
    kafka_dlq_topic: str = Field("persona.events.dlq", description="Topic for rejected events.")
    kafka_group: str = Field("persona-consumer", description="Consumer group id.")
    kafka_partitions: int = Field(4, ge=1, description="Partitions when the consumer creates a missing topic.")
    kafka_session_timeout_ms: int | None = Field(
        None, ge=1000, description="Consumer group session timeout (default: kafka-python's 45 s)."
    )
    kafka_heartbeat_ms: int | None = Field(None, ge=100, description="Consumer heartbeat interval (default 3 s).")
    kafka_fetch_max_wait_ms: int | None = Field(
        None,
        ge=0,
        le=60_000,
        description="Longest the broker may hold a consumer's fetch (default kafka-python's 500).",
    )
    unknown_item_policy: str = Field(
        "skip", pattern="^(skip|dlq)$", description="Unknown items: 'skip' (log, count, skip) or 'dlq'."
    )
    prototype_idle_s: float | None = Field(
        3600.0, ge=0, description="Re-seed a prototype assigned nothing for this many seconds (None = never)."
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Consumer's Prometheus port (0 = off).")
    consumer_threads: int = Field(
        2, ge=1, le=64, description="Threads per consumer process for a batch's model work (encoder, adapter)."
    )
    consumer_model_process: bool = Field(
        True,
        description="Run a consumer's model work (encoder, adapter, prequential check) in a process of its own.",
    )
    consumer_max_batch: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="Events per consumer batch (one store transaction) at most; batches grow to it under a backlog.",
    )
    session_cache: int = Field(
        4096,
        ge=0,
        le=10_000_000,
        description="Sessions a consumer keeps in memory between batches: state, encoder keys/values (~56 KB each).",
    )
    api_host: str = Field("127.0.0.1", description="API bind address.")
    api_port: int = Field(8000, ge=1, le=65535, description="API port.")
    api_keys: list[str] = Field(
        default_factory=list, description="Client keys: accepted on every route but admin ones (see require_api_key)."
    )
    admin_api_keys: list[str] = Field(
        default_factory=list, description="Admin keys: the only keys the admin routes accept (none = admin API off)."
    )
    require_api_key: bool = Field(
        False, description="Require a client or admin key on every route but /healthz, /docs and /openapi.json too."
    )
    open_docs: bool = Field(
        False, description="Keep /docs and /openapi.json open when require_api_key puts the rest behind a key."
    )
    access_log: bool = Field(
        False, description="One log line per API request: method, route template, status, latency, key id."
    )
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Requests per second each client (key, else address) may make; 0 = no limit."
    )
    rate_limit_burst: int = Field(50, ge=1, description="Requests a client may make at once above its rate.")
    rank_max_batch: int = Field(32, ge=1, le=256, description="Concurrent ranking requests served by one forward.")
    rank_max_pending: int = Field(
        1024, ge=1, description="Ranking requests waiting in an API process at most; beyond it, 503 + Retry-After."
    )
    rank_workers: int = Field(
        1, ge=1, le=64, description="Threads ranking a large catalogue (>= 200k items) off the event loop."
    )
    log_level: str = Field("INFO", description="Logging level.")
    seed: int = Field(0, description="Random seed for training and synthetic data.")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'persona.db').as_posix()}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise PersonaError(f"config file {path} does not exist", "fix PERSONA_CONFIG or --config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"config file {path} is not valid TOML: {exc}") from exc
    section = raw.get("persona", raw)
    if not isinstance(section, dict):
        raise PersonaError(f"config file {path}: [persona] must be a table")
    return section


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; a bad value becomes a one-line :class:`PersonaError` naming the setting."""
    path = config_file or (Path(os.environ["PERSONA_CONFIG"]) if os.environ.get("PERSONA_CONFIG") else None)
    file_values = _read_toml(path) if path else {}
    env_names = {k[len("PERSONA_") :].lower() for k in os.environ if k.startswith("PERSONA_")}
    # The environment beats the file: drop file values the environment sets, let pydantic read the env.
    init = {k: v for k, v in file_values.items() if k not in env_names}
    init.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**init)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        raise PersonaError(
            f"invalid setting {name}: {err['msg']}", f"check PERSONA_{name.upper()} or the config file"
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (cached); tests build their own with :func:`load_settings`."""
    return load_settings()

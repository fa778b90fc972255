"""Logging for the ``persona`` commands: our own INFO lines, and only warnings from third-party code.

Libraries narrate their imports at INFO (fbgemm_gpu logs a "Successfully loaded: '….so'" line per library on the
root logger, about a dozen per command): meaningless to a user. At the default level a record below WARNING is kept
only when it comes from one of our packages (or a server's own startup lines); ``-v`` shows everything at DEBUG.
"""

from __future__ import annotations

import logging
import sys

# Top-level logger names whose INFO lines are part of what a command tells its user.
OWN_LOGGERS = frozenset({"persona", "persona_cli", "recsys", "streaming", "serving", "uvicorn", "__main__"})
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers whose warnings are advice to library authors, not to a user (torch warns once per process
# that ``is_fx_tracing`` has two meanings, whenever TorchRec's modules ask it): errors only at the default level.
LIBRARY_ADVICE = ("torch.fx._symbolic_trace",)


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors from anyone, and lower levels only from :data:`OWN_LOGGERS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] in OWN_LOGGERS


def configure(verbose: bool = False) -> None:
    """Set up the root logger once per process: DEBUG and everything with ``verbose``, else INFO of our own."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, stream=sys.stderr)
    if not verbose:
        for name in LIBRARY_ADVICE:
            logging.getLogger(name).setLevel(logging.ERROR)
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
                handler.addFilter(OwnInfoOnly())

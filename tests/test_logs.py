"""A command starts quietly: no third-party load chatter at the default level, all of it with ``-v``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from persona.logs import OwnInfoOnly

PERSONA = str(Path(sys.executable).parent / "persona")


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "m", None, None)


def test_filter_keeps_our_info_and_everyone_s_warnings() -> None:
    f = OwnInfoOnly()
    assert f.filter(_record("persona.offline", logging.INFO))
    assert f.filter(_record("recsys.train", logging.INFO))
    assert f.filter(_record("uvicorn.error", logging.INFO))
    assert not f.filter(_record("root", logging.INFO))  # fbgemm_gpu's "Successfully loaded" lines
    assert not f.filter(_record("kafka.conn", logging.INFO))
    assert f.filter(_record("root", logging.WARNING))
    assert f.filter(_record("kafka.conn", logging.ERROR))


def test_default_level_hides_the_fbgemm_load_lines_and_verbose_shows_them(tmp_path: Path) -> None:
    # `evaluate` imports torchrec (and with it fbgemm_gpu) before it finds the bundle missing.
    missing = str(tmp_path / "missing")
    quiet = subprocess.run([PERSONA, "evaluate", "--model", missing], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([PERSONA, "-v", "evaluate", "--model", missing], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 2
    assert "Successfully loaded" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == [f"error: no model bundle at {missing} (does not exist) "
                                                 f"(train one with `persona train --out {missing}`)"]  # fmt: skip
    assert "Successfully loaded" in loud.stderr


def test_library_advice_is_hidden_at_the_default_level() -> None:
    code = (
        "import sys; from persona import logs; logs.configure(sys.argv[1] == 'v');"
        "from torch.fx._symbolic_trace import is_fx_tracing_warning; is_fx_tracing_warning()"
    )
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code, "v"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr
    assert "is_fx_tracing" not in quiet.stderr
    assert "is_fx_tracing" in loud.stderr

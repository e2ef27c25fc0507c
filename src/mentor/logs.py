"""mentor's console: every log line goes through the ``"mentor"`` logger (and its children), and
:func:`console_logging` prints them when nothing else would.

The command line and :func:`mentor.engine.train` both call it: a run started from Python shows its
progress without any logging set-up, and a program that configures logging itself (a handler on the
root logger, or on ``"mentor"``) gets every line once, through its own handlers.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

log = logging.getLogger("mentor")


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``, and ``HH:MM:SS warning: message`` for warnings and errors."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{record.asctime} {level}{record.message}"


def console_logging(stream: IO[str] | None = None) -> logging.Handler | None:
    """Print mentor's log lines on ``stream`` (default: standard error) unless logging is set up already.

    As Lightning does: when neither the ``"mentor"`` logger nor the root logger has a handler, attach a
    console handler to ``"mentor"`` (level INFO, not propagated to the root, so a root handler added later
    does not print every line twice) and return it; otherwise change nothing and return None."""
    if log.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False
    return handler

"""The library's warnings (logging, logger `i2l.*`) on stderr as `i2l <command>: warning: ...`, each once, while a
command runs: e.g. a broken checkpoint skipped for an older intact one."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager


class _Once(logging.Filter):
    """A message said once: a checkpoint checked early and again at load warns once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


@contextmanager
def echo_warnings(command: str):
    handler = logging.StreamHandler(sys.stderr)  # the stderr of now (a test's captured one, too)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"i2l {command}: warning: %(message)s"))
    handler.addFilter(_Once())
    logger = logging.getLogger("i2l")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)

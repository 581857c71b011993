"""One logger for the library code (``pipeline.*``); the CLI and Ray workers decide where it goes.

Library code reports progress with ``logging.getLogger(__name__)`` and never prints. ``show``
sends those records to standard output as plain lines: the CLI calls it once, and so does each
Ray worker, whose stdout Ray forwards to the driver (``print`` would be logged twice there: Ray
Train patches it).
"""

from __future__ import annotations

import logging
import sys

ROOT = "pipeline"


class _Stdout(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time of the record (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a closed or broken stream must not end the run
            self.handleError(record)


def show(level: int = logging.INFO) -> None:
    """Print the pipeline's log records as plain lines on stdout; idempotent."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False

"""Where the ``ase_bptt`` loggers' lines go on a terminal: stderr, around the progress bars.

Used by the command line and by the worker processes of a training run
(ase_bptt.train.launch), so both print the same lines the same way.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["log_to_stderr"]


class _LogLines(logging.Handler):
    """``ase_bptt`` log records as lines on stderr ("Warning: " before warnings).

    Written through ``tqdm.write``, which lifts an open progress bar, prints
    the line and redraws the bar below it, so a line never splits a bar and
    no bar is printed twice. The stream is looked up per line (click's test
    runner swaps it).
    """

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        prefix = "Warning: " if record.levelno >= logging.WARNING else ""
        try:
            tqdm.write(prefix + self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler must not raise into the caller
            self.handleError(record)


def log_to_stderr(quiet: bool) -> None:
    """Send the ``ase_bptt`` loggers' INFO lines (warnings only with ``quiet``) to stderr, once per process."""
    logger = logging.getLogger("ase_bptt")
    for old in [h for h in logger.handlers if isinstance(h, _LogLines)]:
        logger.removeHandler(old)
    handler = _LogLines(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)

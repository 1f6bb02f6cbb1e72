"""The ``ase-bptt`` command line: parses arguments and calls the data/train functions.

Design rule: no pipeline logic lives here. Each command validates its options,
calls one function from :mod:`ase_bptt.data` or :mod:`ase_bptt.train`, and
prints what it returned. Heavy imports (torch, ase) happen inside the commands
so ``ase-bptt --help`` stays fast.

User errors (a missing file, a bad checkpoint, an unknown element, an empty
split, a database made by another program, ...) are caught in one place,
:meth:`_Group.invoke`, and shown as one ``Error: ...`` line with exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

# Importing the command modules registers their commands on the group, in workflow order.
from ase_bptt.cli import data, training, use  # noqa: F401
from ase_bptt.cli._group import cli, user_errors

__all__ = ["main", "cli", "user_errors"]


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``ase-bptt``)."""
    return cli.main(args=argv, prog_name="ase-bptt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

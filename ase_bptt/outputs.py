"""Checks on a command's output paths, made before any work: never over an input, and writable.

Every command that writes (``pretrain``, ``finetune``, ``evaluate``,
``relax``) calls these first, whatever its flags (``--overwrite`` replaces an
earlier output, never an input).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ase_bptt.errors import AseBpttError

__all__ = ["OutputIsInputError", "OutputNotWritableError", "check_not_inputs", "check_writable_output"]

#: ``(path, what it is)``, e.g. ``("b.db", "the database")``; a None or URL path is skipped.
Named = tuple[Any, str]


class OutputIsInputError(AseBpttError, ValueError):
    """An output path names one of the command's own inputs (also through a symlink or ``./``)."""


class OutputNotWritableError(AseBpttError, OSError):
    """An output cannot be created (an unwritable folder, a directory in its place)."""


def _path(value: Any) -> str | None:
    """The file path of an argument (a path, or an object with a ``.name`` such as a TrajectoryDB); None for URLs."""
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else getattr(value, "name", None)
    return None if text is None or "://" in str(text) else str(text)


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_inputs(outputs: Iterable[Named], inputs: Iterable[Named], *, option: str) -> None:
    """Refuse outputs that are inputs, before anything is written.

    Args:
        outputs: ``(path, what)`` the command would write.
        inputs: ``(path, what)`` the command reads.
        option: the option that names the outputs, for the advice (e.g. ``-o``).

    Raises:
        OutputIsInputError: naming the path, the input it is and the option to change.
    """
    inputs = [(p, what) for value, what in inputs if (p := _path(value)) is not None]
    for value, out_what in outputs:
        out = _path(value)
        if out is None:
            continue
        for inp, in_what in inputs:
            if _same(out, inp):
                same = "" if out == inp else f" (= {inp})"
                raise OutputIsInputError(
                    f"{out}{same} is this command's input ({in_what}); writing {out_what} there would destroy it, "
                    f"whatever the flags: choose another {option}"
                )


def check_writable_output(path: str | os.PathLike, *, option: str, directory: bool = False) -> None:
    """Fail now, before any work, if ``path`` cannot be created later (its folders are made when written).

    Probes the nearest existing folder with a temporary file (removed at
    once): permission bits, read-only mounts and immutable folders all show.

    Raises:
        OutputNotWritableError: naming ``path`` and ``option``.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise OutputNotWritableError(
            f"{path} ({option}) is {kind}; give {option} a {'folder' if directory else 'file'} name"
        )
    folder = path if directory else path.parent
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputNotWritableError(f"{path} ({option}) cannot be created: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ase-bptt-write-check-", dir=folder)
    except OSError as exc:
        raise OutputNotWritableError(
            f"{path} ({option}) cannot be written: the folder {folder} is not writable ({exc.strerror}); "
            f"choose {option} in a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)

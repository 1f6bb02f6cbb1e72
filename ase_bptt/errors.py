"""The one base class of every error ase-bptt raises on purpose.

Each public exception derives from :class:`AseBpttError` and, where it
already had one, from the stdlib class that fits (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working. The CLI
catches ``AseBpttError`` once and prints its message as one ``Error:`` line.
"""

from __future__ import annotations

__all__ = ["AseBpttError", "ModelDependencyError"]


class AseBpttError(Exception):
    """Something the user can fix: the message names the file, structure or option and what to do."""


class ModelDependencyError(AseBpttError):
    """A model needs a package that is not installed, or another version of it (the message says what to install).

    Raised while a model is rebuilt; :func:`ase_bptt.models.checkpoint.load_model` puts the checkpoint's
    name in front of the message.
    """

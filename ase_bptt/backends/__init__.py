"""Universal MLIP backends: foundation models (CHGNet, SevenNet) as energy models of positions.

Importing this package registers the built-in backends in
:mod:`ase_bptt.backends.registry` (``chgnet``, then ``sevenn``) without
importing their packages. A backend's model becomes a ForceModel, a
checkpoint and a calculator through :mod:`ase_bptt.models.universal`
(``load_universal_model("chgnet")``); how much a tuned model forgot is
:func:`ase_bptt.backends.forgetting.forgetting`.
"""

from __future__ import annotations

from ase_bptt.backends.registry import (
    DEFAULT_SKIN,
    Backend,
    BackendError,
    BackendMissingError,
    BackendVersionError,
    backend_class,
    backend_names,
    register_backend,
    unregister_backend,
)

# isort: split
# The built-ins register in this order: the order backend_names() lists them.
from ase_bptt.backends.chgnet import CHGNetBackend
from ase_bptt.backends.sevenn import SevenNetBackend

__all__ = [
    "DEFAULT_SKIN",
    "Backend",
    "BackendError",
    "BackendMissingError",
    "BackendVersionError",
    "CHGNetBackend",
    "SevenNetBackend",
    "backend_class",
    "backend_names",
    "register_backend",
    "unregister_backend",
]

"""One name -> class map, the shape of every extension point (step rules, universal-model backends).

A registered class carries its key in a ``name`` class attribute; registering
a second class under a taken name, or a class without a name, is an error of
the registry's kind, and so is looking up an unknown name (the message lists
the known ones). :mod:`ase_bptt.relax.registry` and
:mod:`ase_bptt.backends.registry` each keep one :class:`Registry`.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Classes by their ``name`` attribute, in registration order.

    Args:
        kind: what a name names, for messages (``"step rule"``).
        error: the exception raised for a bad name (an ``AseBpttError`` subclass).
        unknown_hint: appended to the message for an unknown name (e.g. what else may be passed).
    """

    def __init__(self, kind: str, error: type[Exception], *, unknown_hint: str = "") -> None:
        self.kind, self.error, self.unknown_hint = kind, error, unknown_hint
        self._classes: dict[str, C] = {}

    def register(self, cls: C) -> C:
        """Make ``cls`` known by ``cls.name`` (usable as a class decorator)."""
        name = getattr(cls, "name", "")
        if not name:
            raise self.error(f"{cls.__name__} has no name; set the class attribute name = '...' before registering.")
        taken = self._classes.get(name)
        if taken is not None and taken is not cls:
            raise self.error(
                f"{self.kind} name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; choose another name."
            )
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget the class registered as ``name`` (tests and plugins clean up with this)."""
        self._classes.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (built-ins first)."""
        return tuple(self._classes)

    def get(self, name: Any) -> C:
        """The class registered as ``name``; ``error`` listing the known names otherwise."""
        cls = self._classes.get(name) if isinstance(name, str) else None
        if cls is None:
            choices = ", ".join(repr(n) for n in self._classes)
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {choices}{self.unknown_hint}")
        return cls

"""The step-rule registry: one name -> class map that everything reading a rule name goes through.

``make_step_rule("fixed")``, ``step_rule_from_dict(checkpoint["relax"]["step"])``,
``rule_from_relax_settings``, the fine-tuning config and the CLI's ``--step``
choices all look names up here, so a new rule is one class plus
:func:`register_step_rule`::

    @register_step_rule
    class HalvingStep(FixedStep):
        name = "halving"

        def step_size(self, positions, forces, batch, state, frame):
            return self.eta * 0.5**frame

The built-in rules register when :mod:`ase_bptt.relax` is imported (which any
import of a submodule does first).
"""

from __future__ import annotations

from typing import Any, TypeVar

from ase_bptt.registry import Registry
from ase_bptt.relax.base import StepRule, StepRuleError
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_TOL

__all__ = [
    "register_step_rule",
    "unregister_step_rule",
    "step_rule_names",
    "step_rule_class",
    "make_step_rule",
    "step_rule_from_dict",
    "relax_settings",
    "rule_from_relax_settings",
]

_RULES: Registry[type[StepRule]] = Registry(
    "step rule",
    StepRuleError,
    unknown_hint=" or pass a StepRule. A checkpoint naming it may come from a newer ase-bptt (upgrade) or need "
    "the package that registers it imported first.",
)

R = TypeVar("R", bound=type[StepRule])


def register_step_rule(cls: R) -> R:
    """Class decorator: make ``cls`` known by ``cls.name`` (to checkpoints, ``make_step_rule`` and the CLI).

    Raises:
        StepRuleError: the class has no name, or another class holds it.
    """
    _RULES.register(cls)
    return cls


def unregister_step_rule(name: str) -> None:
    """Forget the rule registered as ``name`` (tests and plugins clean up with this)."""
    _RULES.unregister(name)


def step_rule_names() -> tuple[str, ...]:
    """The registered rule names, in registration order (built-ins first)."""
    return _RULES.names()


def step_rule_class(name: Any) -> type[StepRule]:
    """The class registered as ``name``.

    Raises:
        StepRuleError: no rule has that name.
    """
    return _RULES.get(name)


def step_rule_from_dict(d: dict[str, Any]) -> StepRule:
    """Rebuild a step rule from :meth:`StepRule.to_dict` output (or a checkpoint's flat ``relax`` dict).

    Raises:
        StepRuleError: the dict names no step rule or an unknown one.
    """
    return step_rule_class(d.get("step")).from_dict(d)


def make_step_rule(spec: str | StepRule | dict[str, Any], **options: Any) -> StepRule:
    """Build a step rule from a registered name (``"fixed"``, ``"learned"``, ``"decoder"``, ``"fire"``, ...).

    A ``StepRule`` is returned unchanged; a dict goes to :func:`step_rule_from_dict`.
    A name builds the registered class with :meth:`StepRule.from_options`
    (keyword options ``eta``, ``maxstep``, ``momentum``, ``anneal``, ``noise``;
    see there). ``eta`` (A^2/eV) is the fixed step, or the initial value of a
    learned or decoder step; None means :data:`~ase_bptt.relax.defaults.DEFAULT_ETA`.
    FIRE has its own time step and takes no ``eta``, momentum or annealing.

    Raises:
        StepRuleError: an unknown name, or options the rule does not take.
    """
    if isinstance(spec, StepRule):
        return spec
    if isinstance(spec, dict):
        return step_rule_from_dict(spec)
    cls = step_rule_class(spec)
    return cls.from_options(**options)


def relax_settings(rule: StepRule, *, tol: float = DEFAULT_TOL, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """A checkpoint's ``relax`` dict: ``{"step": rule.to_dict(), "tol": tol, "max_steps": max_steps}``."""
    return {"step": rule.to_dict(), "tol": float(tol), "max_steps": int(max_steps)}


def rule_from_relax_settings(settings: dict[str, Any]) -> tuple[StepRule, float | None, int | None]:
    """``(rule, tol, max_steps)`` from a checkpoint's ``relax`` dict.

    Accepts the nested layout written by :func:`relax_settings` and a flat one
    (the rule's keys next to ``tol`` and ``max_steps``).
    """
    step = settings.get("step")
    rule_dict = step if isinstance(step, dict) else settings
    return step_rule_from_dict(rule_dict), settings.get("tol"), settings.get("max_steps")

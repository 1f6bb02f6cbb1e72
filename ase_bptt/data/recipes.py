"""Built-in structure recipes and reference calculators for the generators.

A recipe builds one unrelaxed structure from a random generator and names it
with a label; :mod:`ase_bptt.data.generate` relaxes it with the reference
calculator and keeps every frame.

- ``si-defects``: diamond silicon, ``size`` conventional cells per side
  (2: 64 sites, 3: 216 sites as in the paper's DFT set), one point defect
  (``vacancy``, ``divacancy``, ``interstitial-tetrahedral``,
  ``interstitial-hexagonal``, ``interstitial-split110``, ``substitution``),
  every atom displaced by a normal random vector (``sigma`` 0.1 A). The
  defect sits at a random lattice site (``site="random"``, default) or, as in
  most DFT defect studies, at the same site of every supercell
  (``site="fixed"``: lattice site 0, interstitials in the origin cell, split
  interstitials along [110]), which makes the relaxed structure of one defect
  type the same target every time. The default reference is Stillinger-Weber (matscipy), which knows only Si, so
  substitutions are made only where the reference supports another element:
  ``reference="tersoff"`` (Tersoff 1989, Si and C) substitutes C; with your own
  calculator pass ``substituents=("Ge",)``.
- ``alloys``: random binary fcc alloys of two of Cu, Ni, Pd, Ag, Pt, Au, Al
  (ASE's EMT, no extra dependency), ``size`` conventional cells per side
  (2: 32 atoms), random composition, a random symmetric strain (up to
  ``strain``) of the Vegard's-law cell and random displacements. The cell is
  fixed during the relaxation (positions only).
- ``fcc-defects``: a multi-element defect set for generalisation tests: an fcc
  ``host`` (Cu, ``size`` 3: 108 sites) with one defect at a random site, relaxed
  with ASE's EMT: ``vacancy``, ``divacancy`` (nearest neighbours), ``sub:X``
  (X on a lattice site), ``int:X`` (X in a <100> split dumbbell with a host
  atom), ``sub:X+vacancy`` and ``sub:X+sub:Y`` (nearest-neighbour pairs); X, Y
  are drawn from ``elements`` (not the host: EMT's Cu self-interstitial has
  degenerate dumbbell and octahedral minima, so the rattle would choose the
  target). Labels name kind and element, so per-label
  tables and leave-one-element-out splits need no other bookkeeping. EMT, not
  Tersoff: matscipy's Tersoff knows only Si and C, while EMT covers seven metals
  and every kind relaxes to the minimum next to its start (measured: rattled and
  unrattled starts of each kind end within 0.011 A of each other), so one
  defect's target does not depend on the rattle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import BaseCalculator
from ase.data import atomic_numbers, reference_states

from ase_bptt.errors import AseBpttError

__all__ = [
    "Recipe",
    "RECIPES",
    "SI_DEFECTS",
    "ALLOY_ELEMENTS",
    "FCC_DEFECTS",
    "MissingDependencyError",
    "RecipeOptionError",
    "resolve_reference",
    "stillinger_weber",
]

SI_DEFECTS = (
    "vacancy",
    "divacancy",
    "interstitial-tetrahedral",
    "interstitial-hexagonal",
    "interstitial-split110",
    "substitution",
)
ALLOY_ELEMENTS = ("Cu", "Ni", "Pd", "Ag", "Pt", "Au", "Al")
FCC_DEFECTS = ("vacancy", "divacancy", "substitution", "interstitial", "substitution-vacancy", "substitution-pair")
DUMBBELL_SEPARATION = 0.6  # in units of the lattice constant: about the EMT <100> dumbbell of Cu (2.2 A)
SI_LATTICE_CONSTANT = 5.431  # A; the equilibrium of Stillinger-Weber (and close to Tersoff's 5.432)
SPLIT110_SEPARATION = 2.3  # A; dumbbell bond length, roughly the DFT value


class RecipeOptionError(AseBpttError, ValueError):
    """A recipe name or ``--option`` value the recipe cannot use; the message names it and the choices."""


class MissingDependencyError(AseBpttError, ImportError):
    """An optional dependency (e.g. matscipy) is not installed."""


# --------------------------------------------------------------- references
def _matscipy():
    try:
        from matscipy.calculators.manybody import Manybody, explicit_forms
    except ImportError as exc:
        raise MissingDependencyError(
            "the Stillinger-Weber and Tersoff references need matscipy: pip install ase-bptt[matscipy]"
        ) from exc
    return Manybody, explicit_forms


def stillinger_weber() -> BaseCalculator:
    """Stillinger-Weber silicon (PRB 31, 5262 (1985)) from matscipy."""
    Manybody, forms = _matscipy()
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        Stillinger_Weber_PRB_31_5262_Si,
    )

    return Manybody(**forms.StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def tersoff() -> BaseCalculator:
    """Tersoff silicon-carbon (PRB 39, 5566 (1989)) from matscipy."""
    Manybody, forms = _matscipy()
    from matscipy.calculators.manybody.explicit_forms.tersoff_brenner import Tersoff_PRB_39_5566_Si_C

    return Manybody(**forms.TersoffBrenner(Tersoff_PRB_39_5566_Si_C))


def emt() -> BaseCalculator:
    """ASE's effective medium theory (Al, Cu, Ag, Au, Ni, Pd, Pt)."""
    from ase.calculators.emt import EMT

    return EMT()


BUILTIN_REFERENCES: dict[str, tuple[Callable[[], BaseCalculator], tuple[str, ...]]] = {
    # name: (factory, elements it supports)
    "sw": (stillinger_weber, ("Si",)),
    "stillinger-weber": (stillinger_weber, ("Si",)),
    "tersoff": (tersoff, ("Si", "C")),
    "emt": (emt, ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")),
}


def resolve_reference(reference: Any) -> tuple[Callable[[], BaseCalculator], str]:
    """Turn a reference specification into ``(factory, name)``.

    Args:
        reference: a built-in name (``"sw"``, ``"tersoff"``, ``"emt"``),
            ``"module:Class"`` (the class is called without arguments), an
            ASE calculator instance, or a callable returning one.

    Raises:
        ValueError: an unknown name or a ``module:Class`` that cannot be
            imported.
        MissingDependencyError: matscipy is missing for ``"sw"``/``"tersoff"``.
    """
    if isinstance(reference, BaseCalculator):
        return (lambda: reference), type(reference).__name__
    if isinstance(reference, str):
        key = reference.lower()
        if key in BUILTIN_REFERENCES:
            factory = BUILTIN_REFERENCES[key][0]
            if key in ("sw", "stillinger-weber", "tersoff"):
                _matscipy()  # fail now, in the parent, with the install hint
            return factory, key
        module_name, sep, attr = reference.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(
                f"unknown reference {reference!r}: use one of {sorted(BUILTIN_REFERENCES)} "
                "or 'module:Class' for any ASE calculator"
            )
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import reference {reference!r}: {exc}") from exc
        return obj, reference
    if callable(reference):
        return reference, getattr(reference, "__name__", type(reference).__name__)
    raise TypeError(
        f"reference must be a name, 'module:Class', a Calculator or a callable, not {type(reference).__name__}"
    )


def supported_elements(reference: Any) -> tuple[str, ...] | None:
    """Elements a built-in reference supports; None when unknown (user calculators)."""
    if isinstance(reference, str) and reference.lower() in BUILTIN_REFERENCES:
        return BUILTIN_REFERENCES[reference.lower()][1]
    return None


# ------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class Recipe:
    """A structure builder plus its default reference and relaxation settings.

    Attributes:
        name: the recipe name (used in traj_ids).
        build: ``build(rng, reference, **options) -> (atoms, label)``.
        default_reference: reference used when none is given.
        defaults: default options, also ``fmax`` and ``max_steps`` of the
            FIRE relaxation.
    """

    name: str
    build: Callable[..., tuple[Atoms, str]]
    default_reference: str
    defaults: dict = field(default_factory=dict)

    def options(self, given: dict) -> dict:
        """The full option dict; element and defect lists accept one name or a comma-separated string."""
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise RecipeOptionError(
                f"recipe {self.name!r} has no option(s) {sorted(unknown)}; its options are {sorted(self.defaults)}"
            )
        out = {**self.defaults, **given}
        for key in ("defects", "substituents", "elements"):
            if isinstance(out.get(key), str):
                out[key] = tuple(name.strip() for name in out[key].split(",") if name.strip())
            elif out.get(key) is not None:
                out[key] = tuple(out[key])
        return out


def _si_substituents(reference: Any, substituents) -> tuple[str, ...]:
    if substituents is not None:
        return tuple(substituents)
    supported = supported_elements(reference)
    return tuple(e for e in (supported or ()) if e != "Si")


def _nearest_neighbour(atoms: Atoms, i: int) -> int:
    d = atoms.get_distances(i, range(len(atoms)), mic=True)
    d[i] = np.inf
    return int(np.argmin(d))


def build_si_defect(
    rng: np.random.Generator,
    reference: Any = "sw",
    *,
    size: int = 2,
    sigma: float = 0.1,
    defects: tuple[str, ...] | None = None,
    substituents: tuple[str, ...] | None = None,
    lattice_constant: float = SI_LATTICE_CONSTANT,
    site: str = "random",
    fmax: float = 0.01,
    max_steps: int = 1000,
) -> tuple[Atoms, str]:
    """One rattled diamond-Si supercell with one point defect.

    Returns:
        ``(atoms, label)``; the label is the defect type
        (``substitution-C`` for a substitution by C).
    """
    del fmax, max_steps  # relaxation settings, used by the generator
    subs = _si_substituents(reference, substituents)
    choices = tuple(defects) if defects is not None else tuple(d for d in SI_DEFECTS if d != "substitution" or subs)
    unknown = set(choices) - set(SI_DEFECTS)
    if unknown:
        raise ValueError(f"unknown defect(s) {sorted(unknown)}; choose from {SI_DEFECTS}")
    if site not in ("random", "fixed"):
        raise ValueError(f"site must be 'random' or 'fixed', got {site!r}")
    if "substitution" in choices and not subs:
        raise ValueError(
            "substitution needs an element the reference supports besides Si: the default "
            "Stillinger-Weber knows only Si. Use reference='tersoff' (C), or pass "
            "substituents=(...) with your own reference calculator"
        )
    defect = choices[rng.integers(len(choices))]
    a = lattice_constant
    atoms = bulk("Si", "diamond", a=a, cubic=True) * (size, size, size)
    n = len(atoms)
    # Draw the random site even for site="fixed", so both share one random stream.
    index = int(rng.integers(n))
    # Interstitial sites are placed relative to a cubic cell at a random origin cell.
    origin = a * rng.integers(size, size=3)
    fixed_site = site == "fixed"
    if fixed_site:
        index, origin = 0, np.zeros(3)
    label = defect
    if defect == "vacancy":
        del atoms[index]
    elif defect == "divacancy":
        j = _nearest_neighbour(atoms, index)
        del atoms[[index, j]]
    elif defect == "interstitial-tetrahedral":
        atoms.append("Si")
        atoms.positions[-1] = origin + a * np.array([0.5, 0.5, 0.5])
    elif defect == "interstitial-hexagonal":
        atoms.append("Si")
        atoms.positions[-1] = origin + a * np.array([0.625, 0.625, 0.625])
    elif defect == "interstitial-split110":
        # Two atoms share one lattice site along a random <110> direction.
        axes = rng.permutation(3)[:2]
        u = np.zeros(3)
        u[axes] = rng.choice([-1.0, 1.0], size=2)
        if fixed_site:
            u = np.array([1.0, 1.0, 0.0])
        u /= np.linalg.norm(u)
        centre = atoms.positions[index].copy()
        atoms.positions[index] = centre - 0.5 * SPLIT110_SEPARATION * u
        atoms.append("Si")
        atoms.positions[-1] = centre + 0.5 * SPLIT110_SEPARATION * u
    elif defect == "substitution":
        element = subs[rng.integers(len(subs))]
        atoms.numbers[index] = atomic_numbers[element]
        label = f"substitution-{element}"
    atoms.positions += rng.normal(scale=sigma, size=atoms.positions.shape)
    atoms.wrap()
    return atoms, label


def _experimental_lattice_constant(symbol: str) -> float:
    return float(reference_states[atomic_numbers[symbol]]["a"])  # type: ignore[index, arg-type]


def build_alloy(
    rng: np.random.Generator,
    reference: Any = "emt",
    *,
    size: int = 2,
    sigma: float = 0.1,
    strain: float = 0.03,
    elements: tuple[str, ...] = ALLOY_ELEMENTS,
    fmax: float = 0.01,
    max_steps: int = 1000,
) -> tuple[Atoms, str]:
    """One random binary fcc alloy, strained and rattled.

    Returns:
        ``(atoms, label)``; the label is the pair in ``elements`` order,
        e.g. ``"Cu-Ni"``.
    """
    del reference, fmax, max_steps
    elements = tuple(elements)
    if len(elements) < 2:
        raise ValueError(f"alloys need at least two elements, got {elements}")
    pair = sorted(rng.choice(len(elements), size=2, replace=False))
    el_a, el_b = elements[pair[0]], elements[pair[1]]
    atoms = bulk(el_a, "fcc", a=1.0, cubic=True) * (size, size, size)
    n = len(atoms)
    x = rng.uniform(0.1, 0.9)
    n_b = int(np.clip(round(x * n), 1, n - 1))
    numbers = np.full(n, atomic_numbers[el_a])
    numbers[rng.choice(n, size=n_b, replace=False)] = atomic_numbers[el_b]
    atoms.numbers = numbers
    # Vegard's law from the experimental lattice constants.
    a_a, a_b = _experimental_lattice_constant(el_a), _experimental_lattice_constant(el_b)
    a = (1 - n_b / n) * a_a + (n_b / n) * a_b
    eps = rng.uniform(-strain, strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array * a @ (np.eye(3) + eps), scale_atoms=True)
    atoms.positions += rng.normal(scale=sigma, size=atoms.positions.shape)
    atoms.wrap()
    return atoms, f"{el_a}-{el_b}"


def build_fcc_defect(
    rng: np.random.Generator,
    reference: Any = "emt",
    *,
    host: str = "Cu",
    elements: tuple[str, ...] = ("Ni", "Pd", "Ag", "Pt", "Au", "Al"),
    defects: tuple[str, ...] = FCC_DEFECTS,
    size: int = 3,
    sigma: float = 0.1,
    lattice_constant: float | None = None,
    fmax: float = 0.01,
    max_steps: int = 1000,
) -> tuple[Atoms, str]:
    """One rattled fcc supercell with one defect (or defect pair) at a random site.

    Returns:
        ``(atoms, label)``; labels: ``vacancy``, ``divacancy``, ``sub:Au``,
        ``int:Au``, ``sub:Au+vacancy``, ``sub:Au+sub:Pd``.
    """
    del fmax, max_steps
    supported = supported_elements(reference)
    wanted = {host, *elements}
    if supported is not None and not wanted <= set(supported):
        raise ValueError(
            f"the reference {reference!r} does not know {sorted(wanted - set(supported))}; "
            f"choose host and elements from {supported}"
        )
    unknown = set(defects) - set(FCC_DEFECTS)
    if unknown or not defects:
        raise ValueError(f"unknown or no defect kind(s) {sorted(unknown)}; choose from {FCC_DEFECTS}")
    others = tuple(e for e in elements if e != host)
    if not others and set(defects) - {"vacancy", "divacancy"}:
        raise ValueError(f"substitutions and interstitials need elements besides the host {host}, got {elements}")
    a = lattice_constant or _experimental_lattice_constant(host)
    defect = defects[rng.integers(len(defects))]
    atoms = bulk(host, "fcc", a=a, cubic=True) * (size, size, size)
    site = int(rng.integers(len(atoms)))
    # One of the twelve nearest neighbours, at random (argmin would always pick the same direction).
    distances = atoms.get_distances(site, range(len(atoms)), mic=True)
    distances[site] = np.inf
    neighbour = int(rng.choice(np.flatnonzero(distances < distances.min() + 1e-6)))
    element = others[rng.integers(len(others))] if others else host
    if defect == "vacancy":
        label, remove = "vacancy", [site]
    elif defect == "divacancy":
        label, remove = "divacancy", [site, neighbour]
    elif defect == "substitution":
        label, remove = f"sub:{element}", []
        atoms.numbers[site] = atomic_numbers[element]
    elif defect == "substitution-vacancy":
        label, remove = f"sub:{element}+vacancy", [neighbour]
        atoms.numbers[site] = atomic_numbers[element]
    elif defect == "substitution-pair":
        second = others[rng.integers(len(others))]
        label, remove = f"sub:{element}+sub:{second}", []
        atoms.numbers[[site, neighbour]] = [atomic_numbers[element], atomic_numbers[second]]
    else:  # interstitial: a <100> split dumbbell of X and a host atom around one lattice site
        label, remove = f"int:{element}", []
        axis = np.zeros(3)
        axis[rng.integers(3)] = rng.choice([-1.0, 1.0])
        centre = atoms.positions[site].copy()
        atoms.positions[site] = centre - 0.5 * DUMBBELL_SEPARATION * a * axis
        atoms.append(element)
        atoms.positions[-1] = centre + 0.5 * DUMBBELL_SEPARATION * a * axis
    del atoms[remove]
    atoms.positions += rng.normal(scale=sigma, size=atoms.positions.shape)
    atoms.wrap()
    return atoms, label


RECIPES: dict[str, Recipe] = {
    "si-defects": Recipe(
        "si-defects",
        build_si_defect,
        "sw",
        dict(
            size=2,
            sigma=0.1,
            defects=None,
            substituents=None,
            lattice_constant=SI_LATTICE_CONSTANT,
            site="random",
            fmax=0.01,
            max_steps=1000,
        ),
    ),
    "alloys": Recipe(
        "alloys",
        build_alloy,
        "emt",
        dict(size=2, sigma=0.1, strain=0.03, elements=ALLOY_ELEMENTS, fmax=0.01, max_steps=1000),
    ),
    "fcc-defects": Recipe(
        "fcc-defects",
        build_fcc_defect,
        "emt",
        dict(
            host="Cu",
            elements=("Ni", "Pd", "Ag", "Pt", "Au", "Al"),
            defects=FCC_DEFECTS,
            size=3,
            sigma=0.1,
            lattice_constant=None,
            fmax=0.01,
            max_steps=1000,
        ),
    ),
}

"""The ``fcc-defects`` recipe: a multi-element defect set relaxed with EMT."""

from __future__ import annotations

import re

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.data import reference_states
from ase.geometry import find_mic
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import generate, relax_frames
from ase_bptt.data.recipes import FCC_DEFECTS, RECIPES, build_fcc_defect

SMALL = dict(size=2)  # 32-site Cu cells: a relaxation takes well under a second
N_SITES = 32
CU_A = reference_states[29]["a"]  # 3.61 A
#: Rattled and unrattled starts of one defect end this close (RMS, A): one minimum per defect.
SAME_MINIMUM = 0.02
LABEL = re.compile(r"^(vacancy|divacancy|(sub|int):[A-Z][a-z]?|sub:[A-Z][a-z]?\+(vacancy|sub:[A-Z][a-z]?))$")


def _build(seed: int, **options):
    opts = RECIPES["fcc-defects"].options({**SMALL, **options})
    return build_fcc_defect(np.random.default_rng([0, seed]), "emt", **opts)


def test_deterministic_for_a_seed():
    (a, label_a), (b, label_b) = _build(7), _build(7)
    assert label_a == label_b
    assert np.array_equal(a.numbers, b.numbers) and np.array_equal(a.positions, b.positions)
    c, _ = _build(8)
    assert len(c) != len(a) or not np.allclose(c.positions, a.positions)


def test_labels_name_kind_and_element_and_match_the_composition():
    seen = set()
    for seed in range(200):
        atoms, label = _build(seed)
        assert LABEL.match(label), label
        symbols = atoms.get_chemical_symbols()
        solutes = sorted(s for s in symbols if s != "Cu")
        kind = label.split(":")[0] if "+" not in label else ("pair-vacancy" if "vacancy" in label else "pair-sub")
        seen.add(kind)
        if label == "vacancy":
            assert len(atoms) == N_SITES - 1 and not solutes
        elif label == "divacancy":
            assert len(atoms) == N_SITES - 2 and not solutes
        elif kind == "sub":
            assert len(atoms) == N_SITES and solutes == [label[4:]]
        elif kind == "int":
            assert len(atoms) == N_SITES + 1 and solutes == [label[4:]]
        elif kind == "pair-vacancy":
            assert len(atoms) == N_SITES - 1 and solutes == [label[4:].split("+")[0]]
        else:
            first, second = label.split("+")
            assert len(atoms) == N_SITES and solutes == sorted([first[4:], second[4:]])
    assert seen == {"vacancy", "divacancy", "sub", "int", "pair-vacancy", "pair-sub"}


def test_pairs_are_nearest_neighbours():
    nn = CU_A / np.sqrt(2)
    for seed in range(60):
        atoms, label = _build(seed, sigma=0.0, defects=("substitution-pair",))
        i, j = [k for k, s in enumerate(atoms.get_chemical_symbols()) if s != "Cu"]
        assert atoms.get_distance(i, j, mic=True) == pytest.approx(nn, abs=1e-9), label


def test_every_trajectory_converged_under_the_reference(tmp_path):
    db = TrajectoryDB(tmp_path / "fcc.db")
    assert generate("fcc-defects", db, n=6, seed=3, progress=False, **SMALL) == 6
    calc = EMT()
    for t in db.trajectories(converged_only=False):
        assert LABEL.match(t.label) and t.source == "generate:fcc-defects:emt"
        last = t.frames[-1].copy()
        last.calc = calc  # an independent EMT evaluation of the stored last frame
        assert np.linalg.norm(last.get_forces(), axis=1).max() < 0.01
        assert t.converged


@pytest.mark.parametrize("defect", ["interstitial", "substitution-vacancy"])
def test_the_rattle_does_not_choose_the_minimum(defect):
    # Two rattles of one unrattled start (an unrattled start itself can rest on a symmetric saddle).
    base, label = _build(2, sigma=0.0, defects=(defect,))
    ends = []
    for seed in (1, 2):
        atoms = base.copy()
        atoms.positions += np.random.default_rng(seed).normal(scale=0.1, size=atoms.positions.shape)
        ends.append(relax_frames(atoms, EMT())[-1])
    d, _ = find_mic(ends[0].positions - ends[1].positions, base.cell, True)
    d -= d.mean(axis=0)  # a rigid shift of the whole cell is the same minimum
    assert np.sqrt((d**2).sum(axis=1).mean()) < SAME_MINIMUM, label


def test_errors_name_the_wrong_option():
    with pytest.raises(ValueError, match="does not know.*'Si'"):
        _build(0, elements=("Si",))
    with pytest.raises(ValueError, match="unknown .*'antisite'"):
        _build(0, defects=("antisite",))
    with pytest.raises(ValueError, match="substitutions and interstitials need elements besides the host"):
        _build(0, elements=("Cu",), defects=("substitution",))
    assert set(FCC_DEFECTS) == set(RECIPES["fcc-defects"].defaults["defects"])


def test_cli_generates_it(tmp_path):
    path = tmp_path / "cli.db"
    args = ["--quiet", "generate", "fcc-defects", str(path), "-n", "2", "--option", "size=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(TrajectoryDB(path, create=False).traj_ids()) == 2

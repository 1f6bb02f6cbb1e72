"""Hold-out splits: whole labels or elements go to test and never leak into train or val."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import generate
from ase_bptt.data.splits import HoldOut, HoldOutError, SplitFractions, recorded_hold_out, split_of

#: (traj_id, label, symbols) of a hand-built database with several elements.
TRAJS = [
    ("t0", "vacancy", "Cu2"),
    ("t1", "sub:Ni", "CuNi"),
    ("t2", "sub:Ni+vacancy", "CuNi"),
    ("t3", "int:Pd", "CuPd"),
    ("t4", "sub:Ni+sub:Pd", "NiPd"),
    ("t5", "divacancy", "Cu2"),
    ("t6", "vacancy", "Cu2"),
    ("t7", "int:Pd", "Cu2Pd"),
    ("t8", "sub:Au", "CuAu"),
    ("t9", None, "Cu2"),
]


def make_frames(symbols: str, seed: int, n_frames: int = 2) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    n = len(Atoms(symbols))
    base = rng.uniform(0, 4, size=(n, 3))
    frames = []
    for i in range(n_frames):
        a = Atoms(symbols, positions=base + 0.01 * i, cell=np.eye(3) * 4.0, pbc=True)
        f = rng.normal(size=(n, 3))
        f /= np.linalg.norm(f, axis=1).max()
        a.calc = SinglePointCalculator(a, energy=-1.0 - i, forces=f * (0.01 if i == n_frames - 1 else 1.0))
        frames.append(a)
    return frames


def build(path, order=None) -> TrajectoryDB:
    db = TrajectoryDB(path)
    for k in order if order is not None else range(len(TRAJS)):
        traj_id, label, symbols = TRAJS[k]
        db.add_trajectory(make_frames(symbols, k), traj_id=traj_id, label=label)
    return db


def splits_of(db: TrajectoryDB) -> dict[str, str | None]:
    return {t.traj_id: t.split for t in db.trajectories(converged_only=False)}


@pytest.fixture
def db(tmp_path):
    return build(tmp_path / "h.db")


def test_element_hold_out_never_leaks_into_train_or_val(db):
    counts = db.assign_splits(val=0.5, seed=1, hold_out=HoldOut("element", ("Ni",)))
    got = splits_of(db)
    # Ni is in t1, t2, t4 (hand-listed); test is exactly them (test fraction 0 among the others).
    assert {t for t, s in got.items() if s == "test"} == {"t1", "t2", "t4"}
    assert counts["test"] == 3 and counts["train"] + counts["val"] == 7
    for split in ("train", "val"):
        for t in db.trajectories(split, converged_only=False):
            assert all("Ni" not in frame.get_chemical_symbols() for frame in t.frames), t.traj_id
    # the others follow the ordinary hash (test 0), every frame row included
    for t, s in got.items():
        if t not in {"t1", "t2", "t4"}:
            assert s == split_of(t, 0.5, 0.0, 1)
    assert {row.split for row in db._db.select(traj_id="t4")} == {"test"}
    assert db.metadata["splits"] == {
        "val": 0.5,
        "test": 0.0,
        "seed": 1,
        "hold_out": [{"kind": "element", "values": ["Ni"]}],
    }
    # ... and shown by summary() (ase-bptt info)
    assert "splits: val=0.5, test=0, seed=1; held out in test: element Ni" in db.summary().splitlines()


def test_two_elements_and_a_label_together(db):
    hold = [HoldOut("element", ("Pd", "Au")), HoldOut("label", ("vacancy",))]
    db.assign_splits(val=0.0, test=0.0, hold_out=hold)
    test = {t for t, s in splits_of(db).items() if s == "test"}
    assert test == {"t3", "t4", "t7", "t8", "t0", "t6"}
    assert {s for t, s in splits_of(db).items() if t not in test} == {"train"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (("sub:Ni",), {"t1"}),  # exact: not sub:Ni+vacancy, not sub:Ni+sub:Pd
        (("vacancy",), {"t0", "t6"}),  # exact: not divacancy
        (("sub:Ni*",), {"t1", "t2", "t4"}),  # a prefix
        (("int:*", "divacancy"), {"t3", "t7", "t5"}),
    ],
)
def test_label_hold_out_sends_exactly_the_matching_trajectories_to_test(db, values, expected):
    db.assign_splits(val=0.0, hold_out=HoldOut("label", values))
    got = splits_of(db)
    assert {t for t, s in got.items() if s == "test"} == expected
    assert {s for t, s in got.items() if t not in expected} == {"train"}


def test_deterministic_and_independent_of_insertion_order(tmp_path):
    hold = HoldOut("element", ("Pd",))
    a = build(tmp_path / "a.db")
    b = build(tmp_path / "b.db", order=list(reversed(range(len(TRAJS)))))
    for d in (a, b):
        d.assign_splits(val=0.3, test=0.2, seed=5, hold_out=hold)
    assert splits_of(a) == splits_of(b)
    # test=0.2 applies to the others too: they keep their hash split, Pd ones are all test
    for t, s in splits_of(a).items():
        assert s == ("test" if t in {"t3", "t4", "t7"} else split_of(t, 0.3, 0.2, 5))


def test_default_test_fraction(db):
    # no hold-out: test defaults to 0.1 as before
    db.assign_splits(val=0.2, seed=2)
    assert db.metadata["splits"]["test"] == 0.1
    assert splits_of(db) == {t: split_of(t, 0.2, 0.1, 2) for t, _, _ in TRAJS}


def test_errors_write_nothing(db):
    for hold, match in (
        (HoldOut("element", ("Ag",)), "element 'Ag' matches no trajectory; elements present: Au, Cu, Ni, Pd"),
        (HoldOut("label", ("sub:Ni", "sub:Zn")), "label 'sub:Zn' matches no trajectory"),
        (HoldOut("element", ("Cu", "Ni")), "takes all 10 trajectories; none is left for training"),
    ):
        with pytest.raises(HoldOutError, match=match):
            db.assign_splits(hold_out=hold)
        assert set(splits_of(db).values()) == {None} and "splits" not in db.metadata


def test_existing_splits_need_reassign(db):
    db.assign_splits(val=0.0, test=0.0)  # everything in train
    with pytest.raises(HoldOutError, match=r"3 held-out trajectories \(e.g. t1\) already have a train or val split"):
        db.assign_splits(val=0.0, hold_out=HoldOut("element", ("Ni",)))
    assert set(splits_of(db).values()) == {"train"}
    db.assign_splits(val=0.0, hold_out=HoldOut("element", ("Ni",)), reassign=True)
    assert {t for t, s in splits_of(db).items() if s == "test"} == {"t1", "t2", "t4"}
    # a new Ni trajectory added later goes to test without reassign
    db.add_trajectory(make_frames("Ni2", 99), traj_id="t10", label="x")
    db.assign_splits(val=0.0, hold_out=HoldOut("element", ("Ni",)))
    assert splits_of(db)["t10"] == "test"


def test_recorded_hold_out_stays_in_force_until_reassigned(db):
    """A later assign_splits without a hold-out (a later import) keeps the recorded one: a new Ni
    trajectory goes to test, not to train by its hash; reassign without a hold-out forgets it."""
    db.assign_splits(val=0.0, hold_out=HoldOut("element", ("Ni",)))
    assert recorded_hold_out(db.metadata) == (HoldOut("element", ("Ni",)),)
    # t10 and t11 would go to train by the hash (val 0, test 0): only the Ni one must not.
    db.add_trajectory(make_frames("CuNi", 10), traj_id="t10", label="sub:Ni")
    db.add_trajectory(make_frames("Cu2", 11), traj_id="t11", label="vacancy")
    db.assign_splits(val=0.0, test=0.0)
    got = splits_of(db)
    assert (got["t10"], got["t11"]) == ("test", "train")
    assert db.metadata["splits"]["hold_out"] == [{"kind": "element", "values": ["Ni"]}]
    # A second hold-out joins the recorded one.
    db.add_trajectory(make_frames("CuAg", 12), traj_id="t12", label="sub:Ag")
    db.assign_splits(val=0.0, hold_out=HoldOut("element", ("Ag",)))
    assert splits_of(db)["t12"] == "test"
    assert recorded_hold_out(db.metadata) == (HoldOut("element", ("Ni",)), HoldOut("element", ("Ag",)))
    db.assign_splits(val=0.0, test=0.0, reassign=True)
    assert set(splits_of(db).values()) == {"train"} and recorded_hold_out(db.metadata) == ()


def test_hold_out_checks_itself():
    with pytest.raises(HoldOutError, match="'Xx' is not a chemical symbol"):
        HoldOut("element", ("Ni", "Xx"))
    with pytest.raises(HoldOutError, match="'ni' is not a chemical symbol"):
        HoldOut("element", ("ni",))
    with pytest.raises(HoldOutError, match="choose from"):
        HoldOut("kind", ("vacancy",))
    with pytest.raises(HoldOutError, match="non-empty"):
        HoldOut("label", ())
    assert HoldOut("label", "vacancy").values == ("vacancy",)
    fr = SplitFractions(val=0.1, test=0.0, hold_out=(HoldOut("element", ("Ni",)),))
    assert fr.split_of("whatever", "vacancy", ["Cu", "Ni"]) == "test"
    assert fr.split_of("whatever", "vacancy", ["Cu"]) == split_of("whatever", 0.1, 0.0, 0)
    assert SplitFractions(hold_out=HoldOut("element", "Ni")).hold_out == (HoldOut("element", ("Ni",)),)


def test_generated_multi_element_set(tmp_path):
    db = TrajectoryDB(tmp_path / "fcc.db")
    # 32-site cells; seed 0's first eight structures hold several solute elements
    hold = (HoldOut("element", ("Pd",)),)
    generate("fcc-defects", db, n=8, progress=False, size=2, splits=SplitFractions(0.25, 0.0, 0, hold))
    info = db.split_info()
    with_pd = {t for t, (_, _, el) in info.items() if "Pd" in el}
    assert with_pd and len(with_pd) < len(info)
    assert {t for t, (_, s, _) in info.items() if s == "test"} == with_pd
    for split in ("train", "val"):
        for t in db.trajectories(split, converged_only=False):
            assert all("Pd" not in f.get_chemical_symbols() for f in t.frames)


def test_generate_more_keeps_the_recorded_hold_out(tmp_path):
    """generate n=3 with Pd held out, then n=8 into the same database without a hold-out: every
    structure with Pd, old or new, is in test (the new ones are split while they are written)."""
    db = TrajectoryDB(tmp_path / "fcc.db")
    hold = (HoldOut("element", ("Pd",)),)
    generate("fcc-defects", db, n=3, progress=False, size=2, splits=SplitFractions(0.0, 0.0, 0, hold))
    first = set(db.split_info())
    generate("fcc-defects", db, n=8, progress=False, size=2, splits=SplitFractions(0.0, 0.0, 0))
    info = db.split_info()
    with_pd = {t for t, (_, _, el) in info.items() if "Pd" in el}
    assert with_pd - first, "seed 0's structures 3-7 hold no Pd: the test would check nothing new"
    assert {t for t, (_, s, _) in info.items() if s == "test"} == with_pd


def test_generate_checks_the_hold_out_before_relaxing(tmp_path):
    db = TrajectoryDB(tmp_path / "fcc.db")
    hold = (HoldOut("label", ("antisite",)),)
    with pytest.raises(HoldOutError, match="label 'antisite' matches no trajectory"):
        generate("fcc-defects", db, n=3, progress=False, size=2, splits=SplitFractions(0.1, 0.0, 0, hold))
    assert len(db) == 0 and "generated" not in db.metadata

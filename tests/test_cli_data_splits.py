"""``--hold-out-label`` / ``--hold-out-element`` on import, generate and split: one error line, nothing written."""

from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from tests.test_data_splits import TRAJS, build, make_frames, splits_of


def run(*args: str):
    return CliRunner().invoke(cli, ["--quiet", *args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1]


@pytest.fixture
def traj_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k, (traj_id, label, symbols) in enumerate(TRAJS[:5]):
        frames = make_frames(symbols, k)
        for f in frames:
            f.info["label"] = label
        ase.io.write(folder / f"{traj_id}.extxyz", frames)
    return folder


def test_import_with_an_element_hold_out(tmp_path, traj_files):
    path = tmp_path / "new.db"
    result = run("import", str(traj_files), "--db", str(path), "--hold-out-element", "Pd", "--val", "0")
    assert result.exit_code == 0, result.output
    db = TrajectoryDB(path, create=False)
    by_label = {t.label: t.split for t in db.trajectories(converged_only=False)}
    # Pd: int:Pd and sub:Ni+sub:Pd; the others all train (--test 0 with a hold-out, --val 0)
    assert by_label == {
        "vacancy": "train",
        "sub:Ni": "train",
        "sub:Ni+vacancy": "train",
        "int:Pd": "test",
        "sub:Ni+sub:Pd": "test",
    }
    assert db.metadata["splits"]["hold_out"] == [{"kind": "element", "values": ["Pd"]}]
    # A later import without --hold-out-element keeps Pd out of train and says so.
    more = tmp_path / "more"
    more.mkdir()
    frames = make_frames("CuPd", 20)
    for f in frames:
        f.info["label"] = "sub:Pd"
    ase.io.write(more / "t20.extxyz", frames)
    result = run("import", str(more), "--db", str(path), "--val", "0", "--test", "0")
    assert result.exit_code == 0, result.output
    assert "held out in test: element Pd" in result.output
    db = TrajectoryDB(path, create=False)
    assert {t.label: t.split for t in db.trajectories(converged_only=False)}["sub:Pd"] == "test"


@pytest.mark.parametrize(
    ("option", "value", "code", "message"),
    [
        ("--hold-out-element", "Xx", 2, "'Xx' is not a chemical symbol"),
        (
            "--hold-out-element",
            "Ag",
            1,
            "Error: hold-out element 'Ag' matches no trajectory; elements present: Cu, Ni, Pd",
        ),
        ("--hold-out-label", "sub:Pd", 1, "Error: hold-out label 'sub:Pd' matches no trajectory; labels present:"),
    ],
)
def test_import_errors_leave_no_database(tmp_path, traj_files, option, value, code, message):
    path = tmp_path / "new.db"
    result = run("import", str(traj_files), "--db", str(path), option, value)
    assert result.exit_code == code, result.output
    assert message in error_line(result) or message in result.output
    assert "Traceback" not in result.output
    assert not path.exists()


def test_import_into_an_existing_database_rolls_back(tmp_path, traj_files):
    path = tmp_path / "old.db"
    build(path).assign_splits(val=0.0, test=0.0)
    other = tmp_path / "other"
    other.mkdir()
    ase.io.write(other / "x.extxyz", make_frames("Cu3", 50))
    result = run("import", str(other), "--db", str(path), "--hold-out-element", "Ag")
    assert result.exit_code == 1 and "matches no trajectory" in error_line(result)
    db = TrajectoryDB(path, create=False)
    assert len(db) == len(TRAJS) and set(splits_of(db).values()) == {"train"}


def test_generate_errors_write_nothing(tmp_path):
    path = tmp_path / "gen.db"
    for option, value, code in (("--hold-out-element", "Qq", 2), ("--hold-out-label", "antisite", 1)):
        result = run("generate", "fcc-defects", str(path), "-n", "2", "--option", "size=2", option, value)
        assert result.exit_code == code, result.output
        assert value in error_line(result) and "Traceback" not in result.output
        assert not path.exists()


def test_split_command(tmp_path):
    path = tmp_path / "s.db"
    build(path).assign_splits(val=0.0, test=0.0)
    # existing splits: a hold-out needs --reassign, and says so
    result = run("split", str(path), "--hold-out-element", "Ni")
    assert result.exit_code == 1
    assert "already have a train or val split" in error_line(result) and "--reassign" in error_line(result)
    result = run(
        "split", str(path), "--hold-out-element", "Ni", "--hold-out-label", "int:*", "--reassign", "--val", "0"
    )
    assert result.exit_code == 0, result.output
    # Ni: t1, t2, t4; int:*: t3, t7
    assert "splits: train 5, val 0, test 5" in result.output
    got = splits_of(TrajectoryDB(path, create=False))
    assert {t for t, s in got.items() if s == "test"} == {"t1", "t2", "t4", "t3", "t7"}
    # a missing database is an error, not a new file
    missing = tmp_path / "missing.db"
    result = run("split", str(missing))
    assert result.exit_code == 1 and not missing.exists()


# ------------------------------------------------------ declared splits (--split)
@pytest.fixture
def test_set(tmp_path):
    """t5..t9 of TRAJS as files: a user's fixed test set."""
    folder = tmp_path / "paper"
    folder.mkdir()
    for k, (traj_id, label, symbols) in list(enumerate(TRAJS))[5:]:
        frames = make_frames(symbols, k)
        for f in frames:
            if label is not None:  # extxyz writes None as a bare key, read back as True
                f.info["label"] = label
        ase.io.write(folder / f"{traj_id}.extxyz", frames)
    return folder


def splits_by_file(path) -> dict[str, str | None]:
    """``{file stem: split}``: the files are named after TRAJS' ids, the traj_ids after their content."""
    return {Path(t.source).stem: t.split for t in TrajectoryDB(path, create=False).trajectories(converged_only=False)}


def sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_declares_the_split_of_what_it_adds(tmp_path, traj_files, test_set):
    path = tmp_path / "d.db"
    assert run("import", str(traj_files), "--db", str(path)).exit_code == 0
    before = sha(path)
    # the same checks as the other split options, before anything is written
    for extra in (["--test", "0.2"], ["--val", "0"]):
        result = run("import", str(test_set), "--db", str(path), "--split", "test", *extra)
        assert result.exit_code == 2 and extra[0] in error_line(result) and "--split" in error_line(result)
    result = run("import", str(test_set), "--db", str(path), "--split", "train", "--hold-out-label", "int:Pd")
    assert result.exit_code == 1 and "were declared train (--split train)" in error_line(result)
    assert sha(path) == before
    result = run("import", str(test_set), "--db", str(path), "--split", "test")
    assert result.exit_code == 0, result.output
    got = splits_by_file(path)
    assert {got[t] for t in ("t5", "t6", "t7", "t8", "t9")} == {"test"}
    db = TrajectoryDB(path, create=False)
    assert {Path(t.source).stem for t in db.trajectories(converged_only=False) if t.traj_id in db.declared()} == {
        "t5",
        "t6",
        "t7",
        "t8",
        "t9",
    }
    # a reassignment moves only the splits drawn by the hash: the declared test set stays test
    result = run("split", str(path), "--reassign", "--val", "0.5", "--test", "0")
    assert result.exit_code == 0, result.output
    got = splits_by_file(path)
    assert {got[t] for t in ("t5", "t6", "t7", "t8", "t9")} == {"test"}
    assert {got[t] for t in ("t0", "t1", "t2", "t3", "t4")} <= {"train", "val"}


def test_split_declares_named_trajectories(tmp_path, traj_files, test_set):
    path = tmp_path / "d.db"
    assert run("import", str(traj_files), str(test_set), "--db", str(path), "--test", "0").exit_code == 0
    ids = {Path(t.source).stem: t.traj_id for t in TrajectoryDB(path, create=False).trajectories(converged_only=False)}
    result = run("split", str(path), "--split", "test", "--source", f"{test_set}/*", "--traj-id", ids["t0"])
    assert result.exit_code == 0, result.output
    assert "declared test: 6 trajectories" in result.output
    result = run("split", str(path), "--split", "train", "--source", "*/t5.extxyz")
    assert result.exit_code == 0, result.output
    got = splits_by_file(path)
    assert got["t5"] == "train" and {got[t] for t in ("t0", "t6", "t7", "t8", "t9")} == {"test"}
    before = sha(path)
    for args, code, text in (
        (["--split", "test"], 2, "--traj-id PATTERN or --source PATTERN"),
        (["--traj-id", "t1"], 2, "give --split too"),
        (["--split", "test", "--traj-id", "t1", "--reassign"], 2, "drop --reassign"),
        (["--split", "test", "--traj-id", "nothing*"], 1, "'nothing*' matches no trajectory"),
    ):
        result = run("split", str(path), *args)
        assert result.exit_code == code and text in error_line(result), result.output
    # a recorded hold-out wins over a declaration that contradicts it
    assert sha(path) == before
    assert run("split", str(path), "--hold-out-label", "int:Pd", "--reassign").exit_code == 0
    before = sha(path)
    result = run("split", str(path), "--split", "val", "--traj-id", ids["t3"])
    assert result.exit_code == 1 and "held out in test" in error_line(result)
    assert splits_by_file(path)["t3"] == "test" and sha(path) == before


def test_generate_takes_a_comma_separated_defect_list_and_refuses_a_bad_one_in_one_line(tmp_path):
    from click.testing import CliRunner

    from ase_bptt.cli import cli
    from ase_bptt.data.db import TrajectoryDB

    db = tmp_path / "si.db"
    res = CliRunner().invoke(
        cli, ["-q", "generate", "si-defects", str(db), "-n", "2", "--option", "defects=vacancy, divacancy"]
    )
    assert res.exit_code == 0, res.output
    labels = {t.label for t in TrajectoryDB(db).trajectories(converged_only=False)}
    assert labels <= {"vacancy", "divacancy"}
    bad = tmp_path / "bad.db"
    res = CliRunner().invoke(cli, ["-q", "generate", "si-defects", str(bad), "-n", "2", "--option", "defects=vacncy"])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "unknown defect(s) ['vacncy']" in res.output and "--option" in res.output
    assert not bad.exists()

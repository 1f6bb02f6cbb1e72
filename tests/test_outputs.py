"""No command writes over its own input, whatever the flags; an unwritable output is found before the work.

Real commands on the tiny EMT copper set of ``test_evaluation_evaluate``; every
refused command leaves its inputs byte-for-byte as they were.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ase.io
import pytest
from click.testing import CliRunner
from test_data_bad_inputs import read_only  # noqa: F401  (a fixture)
from test_evaluation_evaluate import make_checkpoint, make_db

from ase_bptt.cli import cli
from ase_bptt.outputs import OutputIsInputError
from ase_bptt.train.pretrain import PretrainConfig, pretrain


@pytest.fixture
def files(tmp_path):
    db = make_db(tmp_path / "b.db", {"train": 2, "val": 1, "test": 1})
    model = make_checkpoint(tmp_path / "m.pt", db)
    structures = tmp_path / "in.extxyz"
    ase.io.write(structures, [t.initial for t in db.trajectories("test")])
    os.symlink(tmp_path / "b.db", tmp_path / "link.db")
    return {"db": tmp_path / "b.db", "model": Path(model), "in": structures, "root": tmp_path}


def digests(files) -> dict[str, str]:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items() if k != "root"}


def refused(args: list, files) -> str:
    """The one ``Error:`` line of a refused command; its inputs are unchanged and no state file appeared."""
    before = digests(files)
    result = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert digests(files) == before
    assert not list(files["root"].glob("*.state.pt"))
    return line


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("out", ["b.db", "./b.db", "link.db"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_training_never_writes_over_its_database(files, monkeypatch, command, out, flags):
    monkeypatch.chdir(files["root"])
    init = ["--init", str(files["model"])] if command == "finetune" else []
    line = refused([command, "b.db", "-o", out, *init, *flags, "--epochs", "1"], files)
    assert "is this command's input (the database)" in line and "choose another -o/--out" in line


def test_finetune_never_writes_over_its_init_checkpoint(files):
    line = refused(["finetune", files["db"], "-o", files["model"], "--init", files["model"], "--overwrite"], files)
    assert str(files["model"]) in line and "(the --init checkpoint)" in line


def test_pretrain_in_python_refuses_too(files):
    with pytest.raises(OutputIsInputError, match="the database"):
        pretrain(files["db"], files["db"], config=PretrainConfig(epochs=1), overwrite=True)


def test_evaluate_never_writes_over_its_inputs(files):
    from ase_bptt.evaluation.pipeline import evaluate

    # On the command line click already refuses a file as -o; in Python the check is evaluate's own.
    before = digests(files)
    for out, what in ((files["db"], "the database --db"), (files["model"], "a checkpoint to evaluate")):
        with pytest.raises(OutputIsInputError, match=f"\\({what}\\)"):
            evaluate([files["model"]], files["db"], out, plots=False, progress=False)
    model_named_like_a_report = files["root"] / "report.json"
    model_named_like_a_report.write_bytes(files["model"].read_bytes())
    with pytest.raises(OutputIsInputError, match="a checkpoint to evaluate"):
        evaluate([model_named_like_a_report], files["db"], files["root"], plots=False, progress=False)
    assert digests(files) == before


def test_relax_never_writes_over_its_inputs(files):
    for out, what in ((files["in"], "the input"), (files["model"], "the model")):
        line = refused(["relax", files["in"], "--model", files["model"], "-o", out], files)
        assert f"({what})" in line and "-o/--output" in line


def test_relax_finds_an_unwritable_output_before_relaxing(files, read_only, monkeypatch):  # noqa: F811
    from ase_bptt.relax.optimizer import LearnedStepOptimizer

    def never(*args, **kwargs):
        raise AssertionError("relaxed although the output cannot be written")

    monkeypatch.setattr(LearnedStepOptimizer, "run", never)
    folder = files["root"] / "ro"
    folder.mkdir()
    read_only(folder)
    line = refused(["relax", files["in"], "--model", files["model"], "-o", folder / "out.extxyz"], files)
    assert f"{folder / 'out.extxyz'} (-o/--output) cannot be written: the folder {folder} is not writable" in line
    assert ".tmp" not in line

"""The ase-bptt command line: help, one-line user errors, relax round trip, evaluate.

Data and models are the tiny EMT copper set and untrained ADAPT checkpoints of
``test_evaluation_evaluate`` (made here, in a temporary directory).
"""

from __future__ import annotations

import json

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.optimize import FIRE
from click.testing import CliRunner
from test_evaluation_evaluate import make_checkpoint, make_db

from ase_bptt.cli import cli

COMMANDS = ("generate", "import", "split", "check", "info", "pretrain", "finetune", "evaluate", "relax", "demo")
#: Same float64 model, same ASE FIRE: positions agree to round-off.
POSITION_TOL = 1e-8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    db = make_db(root / "cu.db", {"train": 2, "val": 1, "test": 2})
    ckpt = make_checkpoint(root / "cu.pt", db)
    return {"root": root, "db": root / "cu.db", "model": ckpt}


def run(*args: str):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def error_line(result) -> str:
    """The single ``Error: ...`` line of a failed command (and no traceback)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def rattled_cu(n_frames: int, seed: int = 3) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_frames):
        a = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        out.append(a)
    return out


# ------------------------------------------------------------------- help
def test_help_lists_every_command_with_an_example():
    result = CliRunner().invoke(cli, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"\n  {name} " in result.output, name
        assert f"e.g. ase-bptt {name}" in result.output, name


def test_python_dash_m_runs_the_cli():
    """``python -m ase_bptt.cli`` (what ``torchrun ... -m ase_bptt.cli`` runs) is the same command."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ase_bptt.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(f"e.g. ase-bptt {name}" in " ".join(proc.stdout.split()) for name in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_help_has_an_example(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert f"ase-bptt {name}" in result.output.split("Example:")[1]


def test_shared_options_where_they_apply():
    expected = {
        "generate": {"--seed", "--workers"},
        "split": {"--seed"},
        "pretrain": {"--device", "--dtype", "--seed"},
        "finetune": {"--device", "--dtype", "--seed"},
        "evaluate": {"--device", "--dtype"},
        "relax": {"--device", "--dtype"},
        "demo": {"--device", "--dtype", "--seed", "--workers"},
    }
    for name, opts in expected.items():
        params = {o for p in cli.commands[name].params for o in p.opts}
        assert opts <= params, (name, opts - params)


# ----------------------------------------------------------------- errors
def test_missing_file(files, tmp_path):
    line = error_line(run("info", tmp_path / "nope.db"))
    assert "nope.db" in line and "does not exist" in line
    line = error_line(run("evaluate", tmp_path / "nope.pt", "--db", files["db"], "-o", tmp_path / "r"))
    assert "nope.pt" in line
    line = error_line(run("relax", tmp_path / "none.xyz", "--model", files["model"], "-o", tmp_path / "o.xyz"))
    assert "none.xyz" in line


@pytest.mark.parametrize(
    "args, hint",
    [
        (["evaluate", "{model}", "--db", "{db}", "-o", "r", "--split", "everything"], "--split"),
        (["evaluate", "{model}", "--db", "{db}", "-o", "r", "--eta-grid", "0.1,fast"], "--eta-grid"),
        (["relax", "in.xyz", "--model", "{model}", "-o", "o.xyz", "--optimizer", "bfgs"], "--optimizer"),
        (["finetune", "{db}", "-o", "x.pt", "--momentum", "1.5"], "--momentum"),
        (["finetune", "{db}", "-o", "x.pt", "--step", "fire", "--eta", "0.1"], "--step"),
        (["finetune", "{db}", "-o", "x.pt", "--eval-every", "0"], "--eval-every"),
        (["finetune", "{db}", "-o", "x.pt", "--patience", "0"], "--patience"),
        (["finetune", "{db}", "-o", "x.pt", "--lr-schedule", "linear"], "--lr-schedule"),
        (["finetune", "{db}", "-o", "x.pt", "--warmup", "-1"], "--warmup"),
        (["pretrain", "{db}", "-o", "x.pt", "--dtype", "float16"], "--dtype"),
        (["evaluate", "{model}", "--db", "{db}", "-o", "r", "--device", "tpu"], "--device"),
        (["generate", "si-defects", "x.db", "--option", "no-equals-sign"], "--option"),
    ],
)
def test_bad_option_value(files, args, hint):
    result = run(*(a.format(**files) for a in args))
    assert result.exit_code == 2
    assert hint in error_line(result)


def test_finetune_training_controls_reach_the_config(files, tmp_path, monkeypatch):
    import ase_bptt.train.finetune as ft

    seen = {}

    def fake_finetune(db, out, *, init, config, progress, overwrite, workers):
        seen["config"] = config
        return out

    monkeypatch.setattr(ft, "finetune", fake_finetune)
    args = ["finetune", files["db"], "-o", tmp_path / "x.pt", "--eval-every", "5", "--patience", "3"]
    result = run(*args, "--lr-schedule", "onecycle", "--warmup", "10", "--augment")
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.eval_every, c.patience, c.lr_schedule, c.warmup) == (5, 3, "onecycle", 10)
    assert c.augment_translation is True and c.augment_cubic is True
    # No options: the default recipe, which is the config's own defaults.
    assert run("finetune", files["db"], "-o", tmp_path / "y.pt").exit_code == 0
    assert seen["config"].to_dict() == ft.FinetuneConfig().to_dict()
    assert run("finetune", files["db"], "-o", tmp_path / "z.pt", "--no-augment").exit_code == 0
    assert seen["config"].augment_cubic is False
    result = CliRunner().invoke(cli, ["finetune", "--help"], terminal_width=200)
    for option in ("--eval-every", "--patience", "--lr-schedule", "--warmup", "--augment / --no-augment"):
        assert option in result.output, option


def test_unknown_element_in_relax_input(files, tmp_path):
    si = bulk("Si", "diamond", a=5.43)
    ase.io.write(tmp_path / "si.xyz", [rattled_cu(1)[0], si])
    line = error_line(
        run("relax", tmp_path / "si.xyz", "--model", files["model"], "-o", tmp_path / "out.xyz", "--optimizer", "fire")
    )
    assert "Si" in line and "frame 1" in line and "not trained on" in line
    assert not (tmp_path / "out.xyz").exists()


def test_empty_split_in_evaluate(files, tmp_path):
    make_db(tmp_path / "no-test.db", {"train": 1})
    line = error_line(run("evaluate", files["model"], "--db", tmp_path / "no-test.db", "-o", tmp_path / "r"))
    assert "'test'" in line and "no converged trajectories" in line


def test_empty_split_in_finetune(files, tmp_path):
    make_db(tmp_path / "test-only.db", {"test": 1})
    line = error_line(run("finetune", tmp_path / "test-only.db", "--init", files["model"], "-o", tmp_path / "f.pt"))
    assert "train" in line


def test_not_an_ase_bptt_database(files, tmp_path):
    other = tmp_path / "other.db"
    with ase.db.connect(other) as con:
        con.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    for args in (["info", other], ["evaluate", files["model"], "--db", other, "-o", tmp_path / "r"]):
        line = error_line(run(*args))
        assert "other.db" in line and "another program" in line


def test_corrupt_checkpoint(files, tmp_path):
    data = files["model"].read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    line = error_line(run("info", bad))
    assert "bad.pt" in line
    ase.io.write(tmp_path / "cu.xyz", rattled_cu(1))
    line = error_line(run("relax", tmp_path / "cu.xyz", "--model", bad, "-o", tmp_path / "o.xyz"))
    assert "bad.pt" in line
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert "notes.pt" in error_line(run("info", text))


def test_learned_relax_needs_a_stored_step_rule(files, tmp_path):
    bare = make_checkpoint(tmp_path / "bare.pt", make_db(tmp_path / "one.db", {"train": 1}), step_rule=False)
    ase.io.write(tmp_path / "cu.xyz", rattled_cu(1))
    line = error_line(run("relax", tmp_path / "cu.xyz", "--model", bare, "-o", tmp_path / "o.xyz"))
    assert "bare.pt" in line and "--optimizer fire" in line


def test_unexpected_errors_keep_their_traceback(files, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    import ase_bptt.workflows.info as info

    monkeypatch.setattr(info, "describe", boom)
    result = run("info", files["db"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


# -------------------------------------------------------------- commands
def test_info_detects_database_and_checkpoint(files):
    db = run("info", files["db"])
    assert db.exit_code == 0 and "5 trajectories" in db.output and "test" in db.output
    ck = run("info", files["model"])
    assert ck.exit_code == 0 and "ADAPT" in ck.output and "eta=0.02" in ck.output and "Cu" in ck.output


def test_relax_round_trip_with_fire(files, tmp_path):
    from ase_bptt.calculator import BPTTCalculator

    frames = rattled_cu(2)
    ase.io.write(tmp_path / "in.xyz", frames)
    result = run(
        "relax",
        tmp_path / "in.xyz",
        "--model",
        files["model"],
        "-o",
        tmp_path / "out.traj",
        "--optimizer",
        "fire",
        "--fmax",
        "1e-4",
        "--steps",
        "15",
        "--dtype",
        "float64",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 structure(s)" in result.output
    out = ase.io.read(tmp_path / "out.traj", index=":")
    assert len(out) == 2
    calc = BPTTCalculator(files["model"], device="cpu", dtype=torch.float64)
    for before, after in zip(frames, out):
        assert np.abs(after.positions - before.positions).max() > 1e-4  # it moved
        ref = before.copy()
        ref.calc = calc
        FIRE(ref, logfile=None).run(fmax=1e-4, steps=15)
        np.testing.assert_allclose(after.positions, ref.positions, atol=POSITION_TOL)
        assert after.get_forces().shape == (len(after), 3)


def test_relax_writes_the_requested_format(files, tmp_path):
    ase.io.write(tmp_path / "POSCAR", rattled_cu(1)[0], format="vasp")
    result = run(
        "relax",
        tmp_path / "POSCAR",
        "--model",
        files["model"],
        "-o",
        tmp_path / "CONTCAR",
        "--format",
        "vasp",
        "--optimizer",
        "fire",
        "--fmax",
        "1e-4",
        "--steps",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "CONTCAR").read_text().splitlines()[5].split() == ["Cu"]  # a VASP 5 species line
    out = ase.io.read(tmp_path / "CONTCAR", format="vasp")
    start = ase.io.read(tmp_path / "POSCAR", format="vasp")
    assert len(out) == len(start) and np.abs(out.positions - start.positions).max() > 1e-5


def test_evaluate_writes_the_report(files, tmp_path):
    result = run(
        "evaluate",
        files["model"],
        "--db",
        files["db"],
        "-o",
        tmp_path / "rep",
        "--eta-grid",
        "0.01,0.04",
        "--fire-steps",
        "5",
        "--max-steps",
        "10",
    )
    assert result.exit_code == 0, result.output
    assert "perfect information" in result.output and "report.md" in result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["settings"]["eta_grid"] == [0.01, 0.04]
    assert [p.name for p in sorted((tmp_path / "rep").glob("*.png"))] == [
        "dq_paired.png",
        "dq_per_label.png",
        "eta_curve.png",
        "training_curves.png",
    ]
    # --no-plots: the same numbers, no PNG.
    args = ["--db", files["db"], "--eta-grid", "0.01,0.04", "--fire-steps", "5", "--max-steps", "10", "--no-plots"]
    result = run("evaluate", files["model"], "-o", tmp_path / "bare", *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["report.json", "report.md"]
    bare = json.loads((tmp_path / "bare" / "report.json").read_text())
    assert bare["checkpoints"][0]["own_rule"] == report["checkpoints"][0]["own_rule"]


def test_relax_learned_follows_the_checkpoint_step_rule(files, tmp_path):
    # The checkpoint stores FixedStep(eta=0.02), tol 1e-3, 75 frames: the CLI's learned
    # optimizer must land where the batched torch rollout with that rule lands.
    from ase_bptt.batch import Batch
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.relax.relaxer import rollout
    from ase_bptt.relax.steps import FixedStep

    frames = rattled_cu(2, seed=7)
    ase.io.write(tmp_path / "in.extxyz", frames)
    result = run(
        "relax",
        tmp_path / "in.extxyz",
        "--model",
        files["model"],
        "-o",
        tmp_path / "out.extxyz",
        "--dtype",
        "float64",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    out = ase.io.read(tmp_path / "out.extxyz", index=":")
    model = load_model(files["model"], dtype=torch.float64)
    with torch.no_grad():
        ref = rollout(model, Batch.from_atoms(frames), FixedStep(0.02, maxstep=0.2), tol=1e-3, max_steps=75)
    for i, (before, after) in enumerate(zip(frames, out)):
        assert np.abs(after.positions - before.positions).max() > 1e-5
        np.testing.assert_allclose(after.positions, ref.positions[i].numpy(), atol=1e-6)


def test_import_then_info(tmp_path):
    from test_evaluation_evaluate import emt_relaxation

    ase.io.write(tmp_path / "a.extxyz", emt_relaxation(11, vacancy=True))
    ase.io.write(tmp_path / "b.traj", emt_relaxation(12, vacancy=False))
    (tmp_path / "empty.xyz").write_text("")
    result = run(
        "import",
        tmp_path / "a.extxyz",
        tmp_path / "b.traj",
        tmp_path / "empty.xyz",
        "--db",
        tmp_path / "new.db",
        "--label",
        "cu",
    )
    assert result.exit_code == 0, result.output
    assert "added 2 trajectories, skipped 1" in result.output and "empty.xyz" in result.output
    info = run("info", tmp_path / "new.db")
    assert info.exit_code == 0 and "2 trajectories" in info.output and "cu" in info.output


def test_generate_small_alloy_set(tmp_path):
    result = run("generate", "alloys", tmp_path / "alloys.db", "-n", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "added 2 trajectories" in result.output
    again = run("generate", "alloys", tmp_path / "alloys.db", "-n", "2", "--seed", "1")
    assert again.exit_code == 0 and "added 0 trajectories" in again.output
    bad = run("generate", "alloys", tmp_path / "x.db", "--option", "colour=3")
    assert bad.exit_code == 2 and "colour" in error_line(bad)

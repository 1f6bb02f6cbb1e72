"""The command line shows ase_bptt's INFO lines on stderr (``-q``: warnings only), e.g. that a re-run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from click.testing import CliRunner
from conftest import make_cu_db

from ase_bptt.cli import cli
from ase_bptt.runs.loop import KILL_ENV
from ase_bptt.runs.state import load_state, state_path

#: A tiny pretraining: 8 optimiser steps per epoch on the 122 train frames of 4 relaxations.
ARGS = [
    "--epochs",
    "3",
    "--workers",
    "1",
    "--batch-size",
    "16",
    "--d-model",
    "16",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--seed",
    "1",
]


def test_a_rerun_after_a_kill_says_it_resumes(tmp_path):
    db = make_cu_db(tmp_path / "emt.db", n_train=4, n_val=1, n_test=0, seed=2).name
    out = tmp_path / "p.pt"
    killed = subprocess.run(
        [sys.executable, "-m", "ase_bptt.cli", "-q", "pretrain", db, "-o", str(out), *ARGS],
        env={**os.environ, KILL_ENV: "12", "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    epoch = load_state(state_path(out))["loop"]["epoch"]
    assert epoch >= 1  # a state from an epoch end, so the re-run resumes mid-run

    result = CliRunner().invoke(cli, ["pretrain", db, "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    resumed = f"resuming pretrain from {state_path(out)} at epoch {epoch + 1}, batch 0"
    assert lines.count(resumed) == 1, result.output  # a whole line, once, not inside a progress bar
    assert any(line.startswith("pretrain finished: completed 3 epochs") for line in lines)

    again = CliRunner().invoke(cli, ["pretrain", db, "-o", str(out), *ARGS])
    assert again.exit_code == 0 and f"{out} is already finished (completed 3 epochs); nothing to do" in again.output
    quiet = CliRunner().invoke(cli, ["-q", "pretrain", db, "-o", str(out), *ARGS])
    assert quiet.exit_code == 0 and quiet.output == f"wrote {out}\n"

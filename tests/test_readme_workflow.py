"""The README's practitioner workflow, run as written (read from README.md itself) on tiny data.

The lines are the no-option commands a user copies: import their relaxations (and their own test set),
``finetune`` with the default recipe, ``evaluate``, ``relax``. Here the relaxations are EMT copper
vacancies in 7-atom cells, so the default recipe's smallest budgets (1000 pretraining steps, 60 BPTT
steps) take about a minute; what the commands buy on real sizes is measured in docs/results.md.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import ase.io
import pytest
from click.testing import CliRunner
from conftest import emt_cu_relaxation

from ase_bptt.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- practitioner workflow: tests/test_readme_workflow.py runs these lines as written -->"


def workflow_lines() -> list[list[str]]:
    """The ``ase-bptt`` commands of the fenced block right after the marker, as argument lists."""
    text = README.read_text()
    assert MARKER in text, "README.md lost the practitioner workflow block"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    lines = [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines()]
    return [args for args in lines if args]


def test_the_workflow_block_is_the_no_option_path():
    lines = workflow_lines()
    assert [args[:2] for args in lines] == [
        ["ase-bptt", "import"],
        ["ase-bptt", "import"],
        ["ase-bptt", "finetune"],
        ["ase-bptt", "evaluate"],
        ["ase-bptt", "relax"],
    ]
    finetune = next(args for args in lines if args[1] == "finetune")
    assert finetune[2:] == ["traj.db", "-o", "model.pt"]  # no option beyond the output: the default recipe


@pytest.mark.slow
def test_the_readme_workflow_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "vasp_runs").mkdir()
    for k in range(10):
        ase.io.write(tmp_path / "vasp_runs" / f"run{k}.extxyz", emt_cu_relaxation(300 + k), format="extxyz")
    (tmp_path / "my_test_set").mkdir()
    for k in range(2):
        ase.io.write(tmp_path / "my_test_set" / f"held{k}.extxyz", emt_cu_relaxation(400 + k), format="extxyz")
    ase.io.write(tmp_path / "POSCAR", emt_cu_relaxation(500)[0], format="vasp")
    monkeypatch.chdir(tmp_path)
    for args in workflow_lines():
        result = CliRunner().invoke(cli, ["--quiet", *args[1:]])
        assert result.exit_code == 0, (args, result.output)
    model = tmp_path / "model.pt"
    assert model.is_file() and (tmp_path / "model-pretrained.pt").is_file() and (tmp_path / "CONTCAR").is_file()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["split"] == "test" and report["n_structures"] == 2  # the user's own test set, evaluated
    relaxed = ase.io.read(tmp_path / "CONTCAR")
    assert len(relaxed) == 7

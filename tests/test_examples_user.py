"""The user examples in examples/ run on tiny data: tuning on a folder of relaxations through the Python API,
and comparing the result with a universal MLIP. (examples/prerelax_for_dft.py: test_examples_prerelax.py.)"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import ase.io
import pytest
from conftest import emt_cu_relaxation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(stem: str):
    spec = importlib.util.spec_from_file_location(stem, EXAMPLES / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """examples/tune_on_your_relaxations.py --recipe quick on ten EMT copper relaxations (extxyz files)."""
    root = tmp_path_factory.mktemp("tune")
    (root / "runs").mkdir()
    for k in range(10):
        ase.io.write(root / "runs" / f"run{k}.extxyz", emt_cu_relaxation(600 + k), format="extxyz")
    load("tune_on_your_relaxations").main(
        [str(root / "runs"), "--work", str(root / "work"), "--recipe", "quick", "--val", "0.2", "--test", "0.3"]
    )
    return root / "work"


@pytest.mark.slow
def test_tuning_writes_the_models_and_a_report_of_the_test_split(tuned):
    report = json.loads((tuned / "report" / "report.json").read_text())
    assert (tuned / "model.pt").is_file() and (tuned / "model-pretrained.pt").is_file()
    assert report["split"] == "test" and report["n_structures"] >= 1
    assert [entry["path"] for entry in report["checkpoints"]] == [
        str(tuned / "model-pretrained.pt"),
        str(tuned / "model.pt"),
    ]


@pytest.mark.slow
def test_a_non_empty_work_folder_is_refused(tuned):
    with pytest.raises(SystemExit):
        load("tune_on_your_relaxations").main([str(tuned), "--work", str(tuned)])


@pytest.mark.slow
def test_the_comparison_with_a_universal_model_is_the_reports_numbers(tuned, tmp_path):
    pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it
    rows = load("compare_with_universal").compare(
        [tuned / "model-pretrained.pt", tuned / "model.pt"], tuned / "traj.db", tmp_path / "report", eta_grid=[0.02]
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    chgnet = report["baselines"][0]["per_structure"]
    tuned_dq = report["checkpoints"][1]["own_rule"]["per_structure"]
    row = rows["model"]
    assert row["baseline_dq_mean"] == pytest.approx(statistics.fmean(chgnet))
    assert row["mean_ratio"] == pytest.approx(sum(tuned_dq) / sum(chgnet))
    assert row["improved"] == sum(a < b for a, b in zip(tuned_dq, chgnet)) / len(chgnet)

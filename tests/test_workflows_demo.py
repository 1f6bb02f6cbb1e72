"""``ase-bptt demo --quick`` end to end, and a re-run that reuses its products."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB


@pytest.mark.slow
def test_quick_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    # Speed is a benchmark's business, not a unit test's: the quick demo's time
    # (about a minute on an idle 2-core CPU) is reported in docs/demo.md.
    result = CliRunner().invoke(cli, ["--quiet", "demo", "--quick", "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output

    text = result.output
    for row in (
        "do nothing",
        "ASE FIRE",
        "best fixed step (eta chosen on val)",
        "perfect information",
        "BPTT fine-tuned",
    ):
        assert row in text, row
    assert f"report: {out / 'report' / 'report.md'}" in text
    # Every stage reports its wall and CPU time; the headline ratios and a per-kind table follow the Dq table.
    for stage in ("generate", "finetune", "evaluate"):
        assert f"    {stage}: wall " in text, stage
    assert "BPTT / best fixed step: " in text and "Dq mean per defect kind:" in text
    for name in (
        "si-defects.db",
        "model-pretrained.pt",
        "model.pt",
        "report/report.md",
        "report/report.json",
        "report/dq_paired.png",
        "report/dq_per_label.png",
        "report/eta_curve.png",
        "report/training_curves.png",
    ):
        assert (out / name).is_file(), name

    # The printed table is the report's numbers.
    report = json.loads((out / "report" / "report.json").read_text())
    assert [ck["name"] for ck in report["checkpoints"]] == ["pretrained", "tuned"]
    base = report["do_nothing"]["dq"]["mean"]
    line = next(l for l in text.splitlines() if l.startswith("do nothing"))
    assert f"{base:.3f}" in line
    bptt = report["checkpoints"][1]["own_rule"]["dq"]["mean"]
    line = next(l for l in text.splitlines() if l.startswith("BPTT fine-tuned"))
    assert f"{bptt:.3f}" in line
    assert report["selection_split"] == "val" and report["split"] == "test"
    fixed = report["checkpoints"][0]["fixed_step_selected"]["dq"]["mean"]
    assert f"BPTT / best fixed step: {bptt / fixed:.3f}" in text
    # The training is `ase-bptt finetune --recipe quick` with no other option (seed 0, float32, CPU).
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.presets import finetune_config

    stored = load_checkpoint(out / "model.pt")["metadata"]["config"]
    want = finetune_config("quick", seed=0, dtype="float32").to_dict()
    decided = ("tol", "energy_weight", "max_batches", "max_steps")  # "auto" in the recipe, decided by the run
    assert {k: v for k, v in stored.items() if k not in decided} == {k: v for k, v in want.items() if k not in decided}
    # Mixed kinds at random sites (the recipe's options are recorded in the database).
    options = TrajectoryDB(out / "si-defects.db", create=False).metadata["generated"]["si-defects-s0"]["options"]
    assert options["site"] == "random" and len(options["defects"]) == 4

    # A re-run in the same directory reuses the database, checkpoints and report.
    mtimes = {p: (out / p).stat().st_mtime for p in ("model-pretrained.pt", "model.pt", "report/report.json")}
    again = CliRunner().invoke(cli, ["--quiet", "demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "reusing" in again.output
    assert {p: (out / p).stat().st_mtime for p in mtimes} == mtimes
    table = lambda s: s[s.index("Dq (amu") : s.index("report:")]  # noqa: E731
    assert table(again.output) == table(text)

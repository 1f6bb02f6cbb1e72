"""Labels where the tuned model is worse than the pretrained best fixed step: report.json, report.md, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_evaluation_report import report  # noqa: F401 (fixture: a pretrained and a tuned checkpoint evaluated)

from ase_bptt.evaluation.compare import worse_label_lines, worse_labels
from ase_bptt.evaluation.report import _markdown

HEADING = "## Labels where the tuned model is worse than the pretrained best fixed step"


def per_label(values: list[float], labels: list[str]) -> dict:
    return {
        lab: {"mean": float(np.mean([v for v, l in zip(values, labels) if l == lab])), "n": labels.count(lab)}
        for lab in sorted(set(labels))
    }


def constructed() -> dict:
    """Two checkpoints over 5 structures: the tuned one is worse on "int" only (by hand: 3.0 vs 2.0)."""
    labels = ["vac", "vac", "int", "int", "div"]
    fixed = [1.0, 3.0, 1.0, 3.0, 4.0]  # means: vac 2, int 2, div 4
    own = [0.5, 0.5, 2.0, 4.0, 4.0]  # means: vac 0.5, int 3, div 4 (equal: not worse)
    return {
        "metric": "dq",
        "checkpoints": [
            {"name": "pre", "fixed_step_selected": {"chosen_on": "val", "dq": {"per_label": per_label(fixed, labels)}}},
            {"name": "bptt", "own_rule": {"dq": {"per_label": per_label(own, labels)}}},
        ],
    }


def test_constructed_report_flags_exactly_the_worse_label():
    result = constructed()
    assert worse_labels(result) == [
        {"label": "int", "n": 2, "bptt": 3.0, "fixed": 2.0, "ratio": 1.5, "model": "bptt", "fixed_chosen_on": "val"}
    ]
    result["worse_labels"] = worse_labels(result)
    lines = worse_label_lines(result)
    assert len(lines) == 1 and "'int'" in lines[0] and "1.50x" in lines[0] and lines[0].startswith("warning:")
    # Nothing to compare with one checkpoint; an empty list when the tuned model wins everywhere.
    assert worse_labels({"checkpoints": result["checkpoints"][:1]}) is None
    better = copy.deepcopy(result)
    for entry in better["checkpoints"][1]["own_rule"]["dq"]["per_label"].values():
        entry["mean"] = 0.1
    assert worse_labels(better) == [] and worse_label_lines({**better, "worse_labels": []}) == []


def test_evaluate_stores_worse_labels_recomputed_from_per_structure_values(report):  # noqa: F811
    root, _, result = report
    pre, tuned = result["checkpoints"]
    labels = [s["label"] for s in result["structures"]]
    fixed = per_label(pre["fixed_step_selected"]["per_structure"], labels)
    own = per_label(tuned["own_rule"]["per_structure"], labels)
    expected = [lab for lab in sorted(own) if own[lab]["mean"] > fixed[lab]["mean"]]
    assert [w["label"] for w in result["worse_labels"]] == expected
    for w in result["worse_labels"]:
        assert w["bptt"] == pytest.approx(own[w["label"]]["mean"], rel=1e-12)
        assert w["fixed"] == pytest.approx(fixed[w["label"]]["mean"], rel=1e-12)
        assert w["ratio"] == pytest.approx(w["bptt"] / w["fixed"], rel=1e-12)
    on_disk = json.loads((root / "out" / "report.json").read_text())
    assert on_disk["worse_labels"] == result["worse_labels"]
    md = (root / "out" / "report.md").read_text()
    assert HEADING in md


def test_markdown_section_and_cli_warnings_for_a_worse_label(report, tmp_path, monkeypatch):  # noqa: F811
    import importlib

    from click.testing import CliRunner

    from ase_bptt.cli import cli

    evaluate_module = importlib.import_module("ase_bptt.evaluation.pipeline")  # the module, not the function

    _, _, real = report
    result = copy.deepcopy(real)
    pre, tuned = result["checkpoints"]
    # Make the tuned model twice as bad as the pretrained best fixed step on one label, better on the rest.
    labels = sorted(tuned["own_rule"]["dq"]["per_label"])
    for lab in labels:
        base = pre["fixed_step_selected"]["dq"]["per_label"][lab]["mean"]
        tuned["own_rule"]["dq"]["per_label"][lab]["mean"] = 2 * base if lab == labels[0] else 0.5 * base
    result["worse_labels"] = worse_labels(result)
    assert [w["label"] for w in result["worse_labels"]] == [labels[0]]
    md = _markdown(result)
    section = md.split(HEADING, 1)[1].split("\n## ", 1)[0]
    assert f"| {labels[0]}" in section and "2.000" in section
    assert "none" in _markdown({**result, "worse_labels": []}).split(HEADING, 1)[1].split("\n## ", 1)[0]

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: result)
    out = CliRunner().invoke(cli, ["--quiet", "evaluate", "x.pt", "--db", "x.db", "-o", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    warnings = [line for line in out.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and repr(labels[0]) in warnings[0] and "2.00x" in warnings[0]

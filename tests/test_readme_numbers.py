"""Every number of the README's user-path table is the committed raw file's, rounded as printed.

Each row links the folder its run wrote (``studies/results/user-path/<set>/``, by ``studies/user_path.py``):
``results.json`` holds the wall time, the ratios and the errors; ``commands.txt`` the commands run, which must
be the README's workflow block with no option beyond the paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| \[[^\]]+\]\((studies/results/user-path/[\w-]+)/\) \((\d+)\) \|(.*)\|$", re.M)


def table_rows() -> list[tuple[Path, int, list[str]]]:
    rows = [
        (ROOT / folder, int(n), [cell.strip() for cell in rest.split("|")])
        for folder, n, rest in ROW.findall((ROOT / "README.md").read_text())
    ]
    assert len(rows) >= 4, "the README's user-path table lost a row"
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", cell)]


def test_each_readme_row_is_its_raw_file():
    for folder, n_test, cells in table_rows():
        check_row(folder, n_test, cells)


def check_row(folder: Path, n_test: int, cells: list[str]) -> None:
    results = json.loads((folder / "results.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    assert results["n_test"] == n_test == report["n_structures"]
    wall, fixed, fire, force, energy = cells
    assert numbers(wall) == [round(results["wall_s"]["user_path_total"] / 60, 1)]
    for cell, key in ((fixed, "vs_best_fixed_step"), (fire, "vs_ase_fire")):
        ratio = results[key]
        assert numbers(cell) == [
            round(ratio["mean_ratio"], 3),
            round(ratio["median_ratio"], 3),
            round(100 * ratio["improved"]),
        ]
    assert numbers(force) == [round(results["force_mae"]["ratio"], 2)]
    assert numbers(energy) == [round(results["energy_mae_mev_per_atom"]["ratio"], 2)]


def test_the_runs_are_the_readme_commands_with_no_options():
    for folder, _, _ in table_rows():
        lines = (folder / "commands.txt").read_text().splitlines()
        commands = [line.split()[2:] for line in lines if line.startswith("$ ase-bptt ")]  # "$ ase-bptt ..."
        commands = [args[1:] if args[0] == "-q" else args for args in commands]
        finetune = [args for args in commands if args[0] == "finetune"]
        assert finetune == [["finetune", "traj.db", "-o", "model.pt"]]
        evaluate = [args for args in commands if args[0] == "evaluate"]
        assert evaluate == [["evaluate", "model-pretrained.pt", "model.pt", "--db", "traj.db", "-o", "report"]]


def test_the_demo_numbers_are_the_committed_reports():
    """README and docs/demo.md quote the demo's report (docs/demo-report/report.json) as printed."""
    from ase_bptt.evaluation.compare import ratio_stats

    report = json.loads((ROOT / "docs" / "demo-report" / "report.json").read_text())
    pre, tuned = report["checkpoints"]
    own = tuned["own_rule"]
    quoted = []
    for base in (pre["fixed_step_selected"], pre["fire"]):
        stats = ratio_stats(own["per_structure"], base["per_structure"])
        quoted += [f"{own['dq']['mean'] / base['dq']['mean']:.3f}", f"{stats['median_ratio']:.3f}"]
        assert stats["improved"] == 1.0
    quoted += [
        f"{tuned['forces']['mae'] / pre['forces']['mae']:.2f}x",
        f"{tuned['forces']['energy_mae_mev_per_atom'] / pre['forces']['energy_mae_mev_per_atom']:.2f}x",
    ]
    for doc in ("README.md", "docs/demo.md"):
        text = (ROOT / doc).read_text()
        for number in quoted:
            assert number in text, (doc, number)
    assert (ROOT / "docs" / "demo-report" / "output.txt").read_text().count(f"{quoted[0]} (median") == 1


def test_the_reference_steps_saved_are_the_committed_refinements():
    """README quotes docs/demo-report/refine-sw/report.json's mean (and median) reference steps."""
    refinement = json.loads((ROOT / "docs" / "demo-report" / "refine-sw" / "report.json").read_text())["refinement"]
    by_label = {m["label"]: m for m in refinement["methods"]}
    text = (ROOT / "README.md").read_text()
    tuned = by_label["model: as exported (FIREStep)"]
    assert f"need {tuned['steps_mean']:.1f} reference steps on average (median {tuned['steps_median']:.0f})" in text
    for label in ("do nothing (initial structure)", "model-pretrained: ASE FIRE"):
        assert f"{by_label[label]['steps_mean']:.1f} from the" in text, label

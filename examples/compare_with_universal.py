"""Compare a tuned model with a universal MLIP (CHGNet) on your own test relaxations.

    python examples/compare_with_universal.py model-pretrained.pt model.pt --db traj.db --out report/

What a practitioner relaxes with today is a universal model with ASE's FIRE. This evaluates your checkpoints
(first the pretrained one, then the tuned ones) on the test split of ``--db`` beside CHGNet 0.3.0 relaxed by
ASE FIRE on the same structures (``pip install ase-bptt[chgnet]``; the weights ship with the package), and
prints each model's test Dq against CHGNet's: mean ratio, median per-structure ratio and the fraction of
structures where the model lands closer to the reference. ``--baseline`` takes any calculator spec of
``ase-bptt evaluate --baseline`` (``sevenn``, ``emt``, ``module:Class,key=value``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ase_bptt import evaluate
from ase_bptt.evaluation.compare import ratio_stats


def compare(
    checkpoints: list[Path], db: Path, out: Path, baseline: str = "chgnet", eta_grid: list[float] | None = None
) -> dict[str, dict[str, float]]:
    """Per checkpoint: its own relaxation's test Dq against the baseline's, as mean ratio, median ratio, wins.
    ``eta_grid``: the fixed steps the report also tries (default: evaluate's grid)."""
    result = evaluate(checkpoints, db, out, baselines=[baseline], eta_grid=eta_grid, progress=False, plots=False)
    baseline_dq = result["baselines"][0]["per_structure"]  # None where the baseline failed on a structure
    rows = {}
    for entry in result["checkpoints"]:
        own = entry.get("own_rule") or entry["fire"]  # the relaxation it was exported with
        pairs = [(a, b) for a, b in zip(own["per_structure"], baseline_dq) if b is not None]
        dq, reference = [a for a, _ in pairs], [b for _, b in pairs]
        stats = ratio_stats(dq, reference)  # the report's own structure-by-structure comparison
        rows[entry["name"]] = {
            "dq_mean": statistics.fmean(dq),
            "baseline_dq_mean": statistics.fmean(reference),
            **{key: stats[key] for key in ("mean_ratio", "median_ratio", "improved")},
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="the pretrained checkpoint first, then tuned ones")
    parser.add_argument("--db", type=Path, required=True, help="the database with your test split")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.json")
    parser.add_argument("--baseline", default="chgnet", help="calculator to compare with (default chgnet)")
    args = parser.parse_args(argv)
    rows = compare(args.checkpoints, args.db, args.out, args.baseline)
    for name, row in rows.items():
        print(
            f"{name}: test Dq {row['dq_mean']:.3f} against {args.baseline} + ASE FIRE {row['baseline_dq_mean']:.3f}: "
            f"{row['mean_ratio']:.3f}x (median {row['median_ratio']:.3f}, closer on {row['improved']:.0%})"
        )


if __name__ == "__main__":
    main()

"""Between the pretrained and the tuned model: where does a held-out group stop losing?

    python examples/weight_interpolation.py gen-loko/divacancy
    python examples/weight_interpolation.py gen-loeo/Au --alphas 0,0.5,1 --threads 1

For one ``examples/generalisation.py`` group folder (``pretrained.pt``, ``bptt.pt``, ``fcc.db`` and
the evaluation's ``eval/report.json``), the weights ``pretrained + alpha (tuned - pretrained)`` for
each ``--alphas`` value (0: the pretrained model, 1: the tuned one; weight-space interpolation as in
WiSE-FT, Wortsman et al., CVPR 2022, which found it more robust under distribution shift than either
end) relax the val and test structures with the tuned checkpoint's own step rule (its ``relax``
settings) and with the fixed step whose eta the evaluation chose on val for the pretrained model.
Each Dq is compared with the evaluation's baseline, the pretrained model at that fixed step on the
test split (``fixed_step_selected``), per label too. alpha 0 with the fixed step is that baseline
again and alpha 1 with the own rule is the report's BPTT row: the first two checks of the numbers.

The val column is what a rule choosing alpha could see; the test column is a diagnostic (the test
split was already evaluated by the group's run). Writes ``<group>/interpolation.json`` and prints
the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ase_bptt import metrics
from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.relax.registry import step_rule_from_dict
from ase_bptt.relax.rollout import rollout
from ase_bptt.relax.steps import FixedStep


def interpolate(pretrained: dict, tuned: dict, alpha: float) -> dict:
    """State dict ``pretrained + alpha (tuned - pretrained)``; non-float entries are the tuned model's."""
    return {k: pretrained[k] + alpha * (v - pretrained[k]) if v.is_floating_point() else v for k, v in tuned.items()}


@torch.no_grad()
def dq_per_structure(model, rule_of, data: RelaxationDataset, *, tol: float, max_steps: int) -> list[float]:
    """Dq (amu^1/2 A) of every structure of ``data``, relaxed by ``model`` with a fresh ``rule_of()``."""
    out: list[float] = []
    for rb in data.batches(16):
        res = rollout(model, rb.initial, rule_of(), tol=tol, max_steps=max_steps)
        out += metrics.dq(
            res.positions, rb.relaxed.to(res.positions), rb.initial.to(res.positions.device, res.positions.dtype)
        ).tolist()
    return out


def per_label(values: list[float], labels: list[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, lab in zip(values, labels, strict=True):
        groups[lab].append(v)
    return {lab: sum(v) / len(v) for lab, v in sorted(groups.items())}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("group", type=Path, help="an examples/generalisation.py group folder")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated interpolation weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    g = args.group
    report = json.loads((g / "eval" / "report.json").read_text())
    settings = report["settings"]
    baseline = next(c for c in report["checkpoints"] if c["name"] == "pretrained")["fixed_step_selected"]
    eta = float(baseline["eta"])
    base_mean, base_labels = baseline["dq"]["mean"], baseline["dq"]["per_label"]
    own = load_checkpoint(g / "bptt.pt")["relax"]
    pre_state = load_model(g / "pretrained.pt", dtype=torch.float32).state_dict()
    model = load_model(g / "bptt.pt", dtype=torch.float32)
    tuned_state = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = torch.float32  # as the evaluation report
    data = {s: RelaxationDataset(g / "fcc.db", s, dtype=dtype) for s in ("val", "test")}
    rules = {
        "own rule": (lambda: step_rule_from_dict(own["step"]), own["tol"], own["max_steps"]),
        f"fixed step {eta:g}": (
            lambda: FixedStep(eta, maxstep=settings["maxstep"]),
            settings["tol"],
            settings["max_steps"],
        ),
    }
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(pre_state, tuned_state, alpha))
        model.eval()
        for name, (rule_of, tol, max_steps) in rules.items():
            row: dict = {"alpha": alpha, "rule": name}
            for split, d in data.items():
                dq = dq_per_structure(model, rule_of, d, tol=tol, max_steps=max_steps)
                row[split] = mean(dq)
                if split == "test":
                    row["test_per_label"] = per_label(dq, d.labels)
            row["test_over_baseline"] = row["test"] / base_mean
            rows.append(row)
            print(
                f"alpha {alpha:<5g} {name:<16} val {row['val']:.3f}  test {row['test']:.3f}  "
                f"test / baseline {row['test_over_baseline']:.3f}",
                flush=True,
            )
    labels = sorted(base_labels)
    print(f"\ntest / baseline (pretrained, fixed step {eta:g}, Dq {base_mean:.3f}) per label, own rule:")
    print("| alpha | " + " | ".join(labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    for row in rows:
        if row["rule"] == "own rule":
            ratios = [row["test_per_label"][lab] / base_labels[lab]["mean"] for lab in labels]
            print(f"| {row['alpha']:g} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    result = {"group": str(g), "baseline": {"eta": eta, "test": base_mean}, "own_relax": own, "rows": rows}
    (g / "interpolation.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

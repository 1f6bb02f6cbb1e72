"""Between the pretrained and the tuned model: where does a held-out group stop losing?

    python -m studies.weight_interpolation gen-loko/divacancy
    python -m studies.weight_interpolation gen-loeo/Au --alphas 0,0.5,1 --threads 1
    python -m studies.weight_interpolation gen-loko/divacancy --alphas 0,1 --fmax 0.01 --fmax 0.001 --tight-reference

For one ``studies/generalisation.py`` group folder (``pretrained.pt``, ``bptt.pt``, ``fcc.db`` and
the evaluation's ``eval/report.json``), the weights ``pretrained + alpha (tuned - pretrained)`` for
each ``--alphas`` value (0: the pretrained model, 1: the tuned one; weight-space interpolation as in
WiSE-FT, Wortsman et al., CVPR 2022, which found it more robust under distribution shift than either
end) relax the val and test structures with the tuned checkpoint's own step rule (its ``relax``
settings) and with the fixed step whose eta the evaluation chose on val for the pretrained model.
Each Dq is compared with the evaluation's baseline, the pretrained model at that fixed step on the
test split (``fixed_step_selected``), per label too. alpha 0 with the fixed step is that baseline
again and alpha 1 with the own rule is the report's BPTT row: the first two checks of the numbers.

``--fmax F`` adds the tuned rule run until every force is below F eV/A (tol off): every alpha stopped
by the same force criterion, so a difference is where the models' minima are, not where a step rule
stopped. ``--tight-reference`` also scores the test split against its references relaxed on with EMT
(the fcc-defects recipe's calculator) to fmax 1e-4 eV/A, and prints how far the stored references (fmax
0.01) lie from those: the floor of any Dq on the group.

The val column is what a rule choosing alpha could see; the test column is a diagnostic (the test
split was already evaluated by the group's run). Writes ``<group>/interpolation.json`` (or ``--out``)
and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import fmean

import torch

from ase_bptt import metrics
from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.evaluation.split import summary
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.relax.registry import step_rule_from_dict
from ase_bptt.relax.rollout import rollout
from ase_bptt.relax.steps import FixedStep

BATCH = 16  # structures per rollout, as the evaluation report
#: ``--tight-reference``: EMT's minimum, 100x below the recipe's fmax 0.01 eV/A.
TIGHT_FMAX = 1e-4
#: ``--fmax``: frames allowed to reach the force criterion (FIRE needs a few hundred at 1e-3 eV/A).
FMAX_FRAMES = 2000
#: What a group folder of studies/generalisation.py holds and this script reads.
NEEDED = ("pretrained.pt", "bptt.pt", "fcc.db", "eval/report.json")


def interpolate(pretrained: dict, tuned: dict, alpha: float) -> dict:
    """State dict ``pretrained + alpha (tuned - pretrained)``; non-float entries are the tuned model's."""
    if pretrained.keys() != tuned.keys() or any(pretrained[k].shape != v.shape for k, v in tuned.items()):
        raise SystemExit("pretrained.pt and bptt.pt hold different architectures: there is no line between them")
    return {k: pretrained[k] + alpha * (v - pretrained[k]) if v.is_floating_point() else v for k, v in tuned.items()}


@torch.no_grad()
def dq_per_structure(
    model,
    rule_of,
    data: RelaxationDataset,
    *,
    tol: float | None,
    max_steps: int,
    fmax: float | None = None,
    tight: torch.Tensor | None = None,
) -> tuple[list[float], list[float], float]:
    """Dq (amu^1/2 A) of every structure of ``data`` relaxed by ``model`` with a fresh ``rule_of()``: against
    the stored reference, against ``tight`` (padded positions, one row per structure; empty without), and
    the fraction of structures the rule stopped before ``max_steps``."""
    stored: list[float] = []
    against_tight: list[float] = []
    converged = 0
    for index in torch.split(torch.arange(len(data)), BATCH):
        batch, relaxed = data.take(index)
        res = rollout(model, batch, rule_of(), tol=tol, max_steps=max_steps, fmax=fmax)
        batch = batch.to(res.positions.device, res.positions.dtype)
        stored += metrics.dq(res.positions, relaxed.to(res.positions), batch).tolist()
        converged += int(res.converged.sum())
        if tight is not None:
            ref = tight[index, : res.positions.shape[1]].to(res.positions)
            against_tight += metrics.dq(res.positions, ref, batch).tolist()
    return stored, against_tight, converged / len(data)


def tight_references(data: RelaxationDataset) -> torch.Tensor:
    """The stored references relaxed further with EMT (the fcc-defects recipe's calculator) by ASE FIRE to
    fmax TIGHT_FMAX: where the reference's own minimum is (the recipe stops at fmax 0.01 eV/A)."""
    from ase.calculators.emt import EMT
    from ase.optimize import FIRE

    batch, relaxed = data.take(torch.arange(len(data)))
    tight = relaxed.clone()
    for i, atoms in enumerate(batch.to_atoms()):
        n = len(atoms)
        atoms.positions = relaxed[i, :n].double().numpy()
        atoms.calc = EMT()
        if not FIRE(atoms, logfile=None).run(fmax=TIGHT_FMAX, steps=5000):
            raise RuntimeError(f"test structure {i}: EMT did not reach fmax {TIGHT_FMAX} in 5000 FIRE steps")
        tight[i, :n] = torch.as_tensor(atoms.positions, dtype=tight.dtype)
    return tight


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("group", type=Path, help="an studies/generalisation.py group folder")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated interpolation weights")
    p.add_argument(
        "--fmax",
        type=float,
        action="append",
        default=[],
        help="also relax with the tuned rule until every force is below FMAX (eV/A; tol off), the same criterion "
        "for every alpha (repeatable)",
    )
    p.add_argument(
        "--tight-reference",
        action="store_true",
        help="also score the test split against its references relaxed further with EMT to fmax 1e-4 eV/A",
    )
    p.add_argument("-o", "--out", type=Path, default=None, help="JSON to write (default <group>/interpolation.json)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        p.error(f"--alphas {args.alphas!r}: give comma-separated numbers, e.g. 0,0.5,1")
    if not all(math.isfinite(a) for a in alphas) or any(f <= 0 or not math.isfinite(f) for f in args.fmax):
        p.error("--alphas must be finite numbers and every --fmax a positive number (eV/A)")
    g = args.group
    missing = [name for name in NEEDED if not (g / name).is_file()]
    if missing:
        p.error(f"{g} lacks {', '.join(missing)}: give a group folder written by studies/generalisation.py")
    out = args.out or g / "interpolation.json"
    if args.threads:
        torch.set_num_threads(args.threads)
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
        "own rule": (lambda: step_rule_from_dict(own["step"]), own["tol"], own["max_steps"], None),
        f"fixed step {eta:g}": (
            lambda: FixedStep(eta, maxstep=settings["maxstep"]),
            settings["tol"],
            settings["max_steps"],
            None,
        ),
    }
    for fmax in args.fmax:
        rules[f"own rule to fmax {fmax:g}"] = (rules["own rule"][0], None, FMAX_FRAMES, fmax)
    tight = tight_references(data["test"]) if args.tight_reference else None
    if tight is not None:
        d = data["test"]
        batch, relaxed = d.take(torch.arange(len(d)))
        floor = fmean(metrics.dq(relaxed, tight, batch).tolist())
        print(f"stored test references vs EMT's minimum (fmax {TIGHT_FMAX:g}): mean Dq {floor:.3f}", flush=True)
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(pre_state, tuned_state, alpha))
        model.eval()
        for name, (rule_of, tol, max_steps, fmax) in rules.items():
            row: dict = {"alpha": alpha, "rule": name}
            for split, d in data.items():
                on_test = split == "test"
                dq, dq_tight, converged = dq_per_structure(
                    model, rule_of, d, tol=tol, max_steps=max_steps, fmax=fmax, tight=tight if on_test else None
                )
                if not all(math.isfinite(v) for v in dq + dq_tight):
                    raise SystemExit(f"alpha {alpha:g}, {name}, {split}: a relaxation diverged (non-finite Dq)")
                stats = summary(dq, d.labels)  # as the evaluation report's dq entries
                row[split] = stats["mean"]
                row[f"{split}_converged"] = converged
                if on_test:
                    row["test_per_label"] = {lab: v["mean"] for lab, v in stats["per_label"].items()}
                    if dq_tight:
                        row["test_vs_tight_reference"] = fmean(dq_tight)
            row["test_over_baseline"] = row["test"] / base_mean
            rows.append(row)
            print(
                f"alpha {alpha:<5g} {name:<24} val {row['val']:.3f}  test {row['test']:.3f}  "
                f"test / baseline {row['test_over_baseline']:.3f}  converged {row['test_converged']:.2f}"
                + (f"  test vs EMT minimum {row['test_vs_tight_reference']:.3f}" if tight is not None else ""),
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
    if tight is not None:
        result["tight_reference"] = {"fmax": TIGHT_FMAX, "stored_vs_tight": floor}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

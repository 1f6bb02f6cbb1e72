"""Can a structure tell that the tuned model was not tuned for it? A descriptor box as a no-harm gate.

    python -m studies.applicability_gate gen-loko/divacancy gen-random/random
    python -m studies.applicability_gate gen-loko/divacancy -o gate.json

A held-out defect kind can end further from its reference after BPTT than before it (the divacancy
group of leave-one-kind-out: 1.4-1.6x the pretrained model's best fixed step), and the global no-harm
rule cannot see it, since val holds no such structure. This script asks whether a per-structure gate
could: a structure goes to the pretrained model (at the fixed step the evaluation chose on val) when
its atoms' surroundings lie outside what the tuned model was tuned on, and to the tuned model (its own
rule) otherwise.

"Surroundings" are the invariant neighbourhood descriptors the ADAPT-MI tokens see (per radial basis
function: radial density, dipole and quadrupole norms; ``MinImageADAPT.neighbourhood_descriptors``,
default cutoff of 5 A and basis, the cutoff shrunk to just under half the smallest cell height of a group
whose cells are smaller), without the element, so an unseen element is not flagged for its own sake.
The train split's initial and reference structures span a box, one interval per descriptor. A
structure's excursion is the largest distance of any of its atoms outside the box, in units of the
train descriptors' standard deviation (0 inside). Two gates: any excursion (> 0), and an excursion
beyond the largest one in val (the selection split; what a rule choosing the threshold could see).
Val and test are scored on their initial structures, what a gate sees before relaxing.

No relaxation is run: the gated Dq of each test structure is read from the group's evaluation report
(``per_structure`` of the pretrained model's ``fixed_step_selected`` and of the tuned model's
``own_rule``), so the gate costs seconds. The test split is read again (a diagnostic: each group's run
evaluated it). Writes ``<group>/applicability_gate.json`` per group (or one ``--out``) and prints a
table per group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import fmean

import torch

from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.models.mi_attention import MinImageADAPT, MinImageADAPTConfig, cell_heights

#: What a group folder of studies/generalisation.py holds and this script reads.
NEEDED = ("fcc.db", "eval/report.json")
#: Cutoff below half the smallest cell height, as the minimum-image convention needs.
HEIGHT_FRACTION = 0.49
#: Smallest standard deviation of a descriptor used as its unit (a descriptor constant over train).
MIN_SCALE = 1e-6


def describe(featuriser: MinImageADAPT, data: RelaxationDataset, positions: torch.Tensor | None = None) -> list:
    """Neighbourhood descriptors ``(n_atoms, n_descriptors)`` of every structure of ``data`` (initial
    positions, or ``positions`` padded like them)."""
    batch = data.initial
    return featuriser.neighbourhood_descriptors(batch, positions)


def excursion(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest distance of any row of ``x`` outside the box ``[low, high]``, per descriptor in units of
    ``scale``; 0.0 when every row lies inside."""
    outside = torch.maximum(x - high, low - x).clamp(min=0.0) / scale
    return float(outside.max()) if outside.numel() else 0.0


def featuriser_for(data: RelaxationDataset) -> MinImageADAPT:
    """An untrained ADAPT-MI model used only for its descriptors: default cutoff and basis, the cutoff
    lowered where ``data``'s cells are too small for it."""
    batch = data.initial
    height = float(cell_heights(batch.cell, batch.pbc).min())
    cutoff = min(MinImageADAPTConfig.cutoff, HEIGHT_FRACTION * height)
    return MinImageADAPT(MinImageADAPTConfig(cutoff=cutoff)).double().eval()


def gate_group(group: Path) -> dict:
    """The box of ``group``'s train split, every val and test structure's excursion, and the test
    split's mean Dq under each gate over the evaluation's baseline."""
    db = group / "fcc.db"
    train = RelaxationDataset(db, "train", dtype=torch.float64)
    featuriser = featuriser_for(train)
    _, relaxed = train.take(torch.arange(len(train)))
    spanned = torch.cat(describe(featuriser, train) + describe(featuriser, train, relaxed))
    low, high = spanned.min(0).values, spanned.max(0).values
    scale = spanned.std(0).clamp(min=MIN_SCALE)
    scores = {}
    for split in ("val", "test"):
        data = RelaxationDataset(db, split, dtype=torch.float64)
        scores[split] = (data, [excursion(x, low, high, scale) for x in describe(featuriser, data)])
    report = json.loads((group / "eval" / "report.json").read_text())
    test, test_scores = scores["test"]
    if [s["traj_id"] for s in report["structures"]] != test.traj_ids:
        raise SystemExit(f"{group}: eval/report.json was written for other test structures than fcc.db holds")
    by_name = {c["name"]: c for c in report["checkpoints"]}
    pretrained, tuned = by_name["pretrained"], by_name["BPTT"]
    baseline = pretrained["fixed_step_selected"]["per_structure"]
    own = tuned["own_rule"]["per_structure"]
    base_mean = fmean(baseline)
    val_scores = scores["val"][1]
    thresholds = {"any excursion": 0.0, "beyond val's largest": max(val_scores, default=0.0)}
    gates = {}
    for name, threshold in thresholds.items():
        flagged = [s > threshold for s in test_scores]
        gated = [b if f else t for f, b, t in zip(flagged, baseline, own)]
        per_label: dict[str, list[int]] = {}
        for label, f in zip(test.labels, flagged):
            per_label.setdefault(label, [0, 0])
            per_label[label][0] += int(f)
            per_label[label][1] += 1
        gates[name] = {
            "threshold": threshold,
            "test_flagged": sum(flagged),
            "val_flagged": sum(s > threshold for s in val_scores),
            "test_over_baseline": fmean(gated) / base_mean,
            "flagged_per_label": per_label,
        }
    return {
        "group": str(group),
        "cutoff": featuriser.config.cutoff,
        "n_train": len(train),
        "n_val": len(val_scores),
        "n_test": len(test_scores),
        "baseline": {"eta": pretrained["fixed_step_selected"]["eta"], "test": base_mean},
        "tuned_over_baseline": fmean(own) / base_mean,
        "gates": gates,
        "val_excursions": val_scores,
        "test_excursions": dict(zip(test.traj_ids, test_scores)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("groups", type=Path, nargs="+", help="studies/generalisation.py group folders")
    p.add_argument("-o", "--out", type=Path, default=None, help="one JSON for all groups (default: one per group)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    for g in args.groups:
        missing = [name for name in NEEDED if not (g / name).is_file()]
        if missing:
            p.error(f"{g} lacks {', '.join(missing)}: give a group folder written by studies/generalisation.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for g in args.groups:
        r = gate_group(g)
        results.append(r)
        print(
            f"\n{g}: train {r['n_train']}, val {r['n_val']}, test {r['n_test']}; "
            f"tuned / baseline {r['tuned_over_baseline']:.3f}"
        )
        print("| gate | threshold | val flagged | test flagged | gated test / baseline | flagged per label (of n) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, gate in r["gates"].items():
            labels = ", ".join(f"{lab} {f}/{n}" for lab, (f, n) in sorted(gate["flagged_per_label"].items()) if f)
            print(
                f"| {name} | {gate['threshold']:.3f} | {gate['val_flagged']}/{r['n_val']} | "
                f"{gate['test_flagged']}/{r['n_test']} | {gate['test_over_baseline']:.3f} | {labels or '-'} |"
            )
        if args.out is None:
            (g / "applicability_gate.json").write_text(json.dumps(r, indent=1) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What limits BPTT's gain on interstitials: the step rule, the force model or the tuning.

    python -m studies.interstitial_limits --out limits                  # the full run (not run in the tests)
    python -m studies.interstitial_limits --out limits --stages oracle  # one stage (others are reused)
    python -m studies.interstitial_limits --out /tmp/l --quick          # a smoke run of every stage

On the demo's data (ase_bptt/workflows/demo.py: four defect kinds at random sites
of 64-site silicon cells) BPTT gains much more on vacancies than on
interstitials. This script measures why, on the VAL split only (it never reads
the test split; every choice it makes, the fixed step eta included, is made on
val and scored on val, so its numbers are diagnostics, not test results):

1. ``oracle``: the fixed-step rule ``X += eta F`` driven by the REFERENCE
   Stillinger-Weber forces (``maxstep`` cap, stop when the RMS step is below
   ``tol``, at most ``max_steps`` frames: the package's defaults), eta in
   (0.035, 0.065). Its Dq per kind is what a perfect force model reaches with
   that rule: where it is large, the rule (not the model) is the limit.
2. ``pretrain``: force-matching variants (ADAPT d_model 32; the same with
   random translations; ADAPT d_model 64 x 3 layers; the translation-invariant
   ADAPT-MI), each with its val force MAE / RMSE (overall and per kind) and its
   val Dq with the fixed step at the val-best eta of ``--eta-grid``, per kind.
3. ``bptt``: BPTT from the ADAPT d32 and the ADAPT-MI pretrained models
   (ADAPT-MI with force-matching weights 0, 10 and 50): val Dq with the tuned
   model's own step rule, its ratio to the pretrained model's val-best fixed
   step (overall and per kind), and the val force MAE.
4. ``fire``: BPTT through the FIRE step rule from ADAPT d32, then ASE FIRE
   (``BPTTCalculator``) with the pretrained and the tuned model: the ratio.

Per-kind numbers always list vacancy, divacancy, interstitial-tetrahedral and
interstitial-split110 (null where a kind has no val relaxation). Budgets are
optimiser steps with a seed, so a rerun gives the same numbers at any machine
load. Every stage leaves its product in ``--out`` (checkpoints, ``<stage>.json``)
and is skipped when it is there; ``results.json`` and ``summary.md`` collect
every finished stage.

Cost of the full run, measured stage by stage on the 2-core machine on
2026-11-30 (one torch thread, the demo's database copied into ``--out`` so
generation was skipped; generating it costs ~185 CPU-s): oracle 30 s, pretrain
510 s, bptt 988 s, fire 165 s (bptt and fire side by side), about 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.data.datasets import load_relaxations
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.recipes import stillinger_weber
from ase_bptt.evaluation.pipeline import evaluate
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.relax.base import cap_displacement
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_MAXSTEP, DEFAULT_TOL
from ase_bptt.train.finetune import finetune
from ase_bptt.train.presets import finetune_config, pretrain_config
from ase_bptt.train.pretrain import pretrain
from ase_bptt.workflows.demo import DEMO_DEFECTS
from ase_bptt.workflows.demo import FULL as DEMO_FULL
from studies.common import Log, fmt, per_label, table

STAGES = ("oracle", "pretrain", "bptt", "fire")
KINDS = DEMO_DEFECTS  # vacancy, divacancy, interstitial-tetrahedral, interstitial-split110

_ADAPT = {"d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}
_MI = {"model_name": "adapt-mi", "d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}


@dataclass
class Settings:
    """Sizes and budgets of one run (``FULL`` or ``QUICK``)."""

    n_trajectories: int
    val: float
    test: float
    generate: dict[str, Any]
    pretrain: dict[str, Any]
    #: name -> PretrainConfig overrides (the model, and options such as augment_translation)
    pretrain_variants: dict[str, dict[str, Any]]
    finetune: dict[str, Any]
    #: name -> (pretrained variant, FinetuneConfig overrides)
    bptt_variants: dict[str, tuple[str, dict[str, Any]]]
    fire: tuple[str, dict[str, Any]]
    eta_grid: tuple[float, ...] = (0.02, 0.035, 0.05, 0.065, 0.08)
    oracle_etas: tuple[float, ...] = (0.035, 0.065)
    fire_fmax: float = 0.05
    fire_steps: int = 300
    extra: dict[str, Any] = field(default_factory=dict)


_MI_BPTT = {"max_batches": 60, "batch_size": 8, "lr": 5e-4, "eval_every": 10}

#: The demo's data (ase_bptt/workflows/demo.py FULL) and the budgets of the lead's measurements.
FULL = Settings(
    n_trajectories=DEMO_FULL.n_trajectories,
    val=0.15,
    test=0.15,
    generate=dict(DEMO_FULL.generate_options),
    pretrain={"epochs": 1000, "max_steps": 2000, "batch_size": 16, "lr": 2e-3, "patience": None, "eval_frames": 500},
    pretrain_variants={
        "adapt-d32": {"model": _ADAPT},
        "adapt-d32-translate": {"model": _ADAPT, "augment_translation": True},
        "adapt-d64x3": {"model": {"d_model": 64, "d_ff": 128, "n_layers": 3, "n_heads": 4}},
        "adapt-mi": {"model": _MI},
    },
    finetune={"epochs": 1000, "grid_structures": 32},
    bptt_variants={
        "adapt-d32": ("adapt-d32", {"max_batches": 150, "batch_size": 16, "lr": 1e-3}),
        "adapt-mi-w0": ("adapt-mi", {**_MI_BPTT, "force_weight": 0.0}),
        "adapt-mi-w10": ("adapt-mi", {**_MI_BPTT, "force_weight": 10.0}),
        "adapt-mi-w50": ("adapt-mi", {**_MI_BPTT, "force_weight": 50.0}),
    },
    fire=("adapt-d32", {"step": "fire", "max_batches": 100, "batch_size": 8, "lr": 2e-4, "tol": 1e-5}),
)

_Q_MI_BPTT = {"max_batches": 2, "batch_size": 2, "lr": 5e-4, "eval_every": 1, "max_steps": 10}

#: 8-site cells and a few optimiser steps: every stage in well under two minutes.
QUICK = Settings(
    n_trajectories=12,
    val=0.5,
    test=0.15,
    generate={**DEMO_FULL.generate_options, "size": 1, "fmax": 0.03},
    pretrain={"epochs": 100, "max_steps": 20, "batch_size": 16, "lr": 2e-3, "patience": None, "eval_frames": 64},
    # ADAPT-MI's minimum image needs cells taller than twice its cutoff: 2.6 A fits the 5.43 A cells.
    pretrain_variants={**FULL.pretrain_variants, "adapt-mi": {"model": {**_MI, "cutoff": 2.6}}},
    finetune={"epochs": 100, "grid_structures": 4},
    bptt_variants={
        "adapt-d32": ("adapt-d32", {"max_batches": 2, "batch_size": 2, "lr": 1e-3, "max_steps": 10}),
        "adapt-mi-w0": ("adapt-mi", {**_Q_MI_BPTT, "force_weight": 0.0}),
        "adapt-mi-w10": ("adapt-mi", {**_Q_MI_BPTT, "force_weight": 10.0}),
        "adapt-mi-w50": ("adapt-mi", {**_Q_MI_BPTT, "force_weight": 50.0}),
    },
    fire=("adapt-d32", {"step": "fire", "max_batches": 2, "batch_size": 2, "lr": 2e-4, "tol": 1e-5, "max_steps": 10}),
    eta_grid=(0.035, 0.065),
    fire_steps=10,
)


# ------------------------------------------------------------------ helpers
def kinds(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (label -> number) with every kind of :data:`KINDS` present (None where absent)."""
    return {k: values.get(k) for k in KINDS} | {k: v for k, v in values.items() if k not in KINDS}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")


def oracle_dq(data, eta: float, calc, *, maxstep: float, tol: float, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-structure Dq and frames of the fixed-step rule ``X += eta F`` with the reference forces ``calc``."""
    dqs, frames = [], []
    for i in range(len(data)):
        batch, relaxed = data.take(torch.tensor([i]))
        atoms = batch.to_atoms()[0]
        atoms.calc = calc
        n = len(atoms)
        frame = 0
        while frame < max_steps:
            forces = torch.from_numpy(atoms.get_forces())[None]
            step = cap_displacement(eta * forces, maxstep)[0].numpy()
            atoms.positions = atoms.positions + step
            frame += 1
            if math.sqrt(float((step**2).sum(1).mean())) < tol:  # RMS per-atom step, as the package's rollouts
                break
        final = batch.positions.clone()
        final[0, :n] = torch.from_numpy(atoms.positions)
        dqs.append(float(metrics.dq(final, relaxed, batch)[0]))
        frames.append(frame)
    return np.asarray(dqs), np.asarray(frames)


@torch.no_grad()
def force_mae_per_kind(model, db: TrajectoryDB, split: str, *, batch_size: int = 16) -> dict[str, float | None]:
    """Force MAE (eV/A) of ``model`` on every frame of ``split``, per trajectory label."""
    sums: dict[str, list[float]] = {}
    for traj in db.trajectories(split=split, converged_only=False):
        acc = sums.setdefault(traj.label or "", [0.0, 0.0])
        for start in range(0, len(traj.frames), batch_size):
            chunk = traj.frames[start : start + batch_size]
            batch = Batch.from_atoms(chunk, dtype=torch.float32, constraints=False)
            predicted = model(batch).forces.detach().double()
            b64 = batch.to(dtype=torch.float64)
            ref = torch.zeros_like(b64.positions)
            for i, atoms in enumerate(chunk):
                ref[i, : len(atoms)] = torch.from_numpy(np.asarray(atoms.calc.results["forces"], dtype=np.float64))
            n_comp = (3 * b64.n_atoms).double()
            acc[0] += float((metrics.force_errors(predicted, ref, b64)["mae"] * n_comp).sum())
            acc[1] += float(n_comp.sum())
    return kinds({k: s / n for k, (s, n) in sorted(sums.items()) if n})


def _evaluate(checkpoints: list, db: TrajectoryDB, where: Path, **options: Any) -> dict[str, Any]:
    """:func:`evaluate` on val with the eta chosen on val; the report goes to ``where/report.json`` (no plots)."""
    report = evaluate(checkpoints, db, None, split="val", select_eta_on="val", device="cpu", progress=False, **options)
    where.mkdir(parents=True, exist_ok=True)
    (where / "report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=True) + "\n")
    return report


def _dq_entry(method: dict[str, Any]) -> dict[str, Any]:
    return {
        "mean": method["dq"]["mean"],
        "per_kind": kinds({k: v["mean"] for k, v in method["dq"]["per_label"].items()}),
    }


def _per_kind_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {k: ratio(a["per_kind"].get(k), b["per_kind"].get(k)) for k in a["per_kind"]}


# ------------------------------------------------------------------- stages
def build_db(out: Path, s: Settings, seed: int, log: Log) -> TrajectoryDB:
    from ase_bptt.data.generate import generate

    path = out / "si-defects.db"
    db = TrajectoryDB(path)
    if len(db) == 0:
        log(f"generating {s.n_trajectories} si-defects relaxations (the demo's recipe) into {path}")
        generate("si-defects", db, n=s.n_trajectories, seed=seed, progress=False, **s.generate)
        db.assign_splits(val=s.val, test=s.test, seed=seed)
    return db


def stage_oracle(db: TrajectoryDB, out: Path, s: Settings, log: Log) -> dict[str, Any]:
    path = out / "oracle.json"
    if (done := _load_json(path)) is not None:
        return done
    val = load_relaxations(db, "val")
    if val is None:
        sys.exit("no converged val relaxations")
    calc = stillinger_weber()
    result: dict[str, Any] = {
        "maxstep": DEFAULT_MAXSTEP,
        "tol": DEFAULT_TOL,
        "max_steps": DEFAULT_MAX_STEPS,
        "n_val": len(val),
        "etas": {},
    }
    for eta in s.oracle_etas:
        dq, frames = oracle_dq(val, eta, calc, maxstep=DEFAULT_MAXSTEP, tol=DEFAULT_TOL, max_steps=DEFAULT_MAX_STEPS)
        entry = {
            "mean": float(dq.mean()),
            "per_kind": kinds(per_label(dq, val.labels)),
            "frames_mean": float(frames.mean()),
            "per_kind_count": {k: val.labels.count(k) for k in KINDS},
        }
        result["etas"][f"{eta:g}"] = entry
        log(f"oracle (reference forces) eta {eta:g}: val Dq {entry['mean']:.4g} " + _kinds_text(entry["per_kind"]))
    _save_json(path, result)
    return result


def _kinds_text(values: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {fmt(v)}" for k, v in values.items()) + ")"


def pretrained(db: TrajectoryDB, out: Path, s: Settings, name: str, seed: int, log: Log) -> dict[str, Any]:
    """Train (when missing) and score (when not yet scored) one pretraining variant on val."""
    stage = out / "pretrain" / name
    stage.mkdir(parents=True, exist_ok=True)
    ckpt = stage / "pretrained.pt"
    if not ckpt.exists():
        cfg = {**s.pretrain, **s.pretrain_variants[name], "device": "cpu", "seed": seed}
        log(f"pretraining {name} ({cfg['max_steps']} optimiser steps): {s.pretrain_variants[name]}")
        pretrain(db, ckpt, config=pretrain_config("paper", **cfg), progress=False)
    path = stage / "val.json"
    if (done := _load_json(path)) is not None:
        return done
    log(f"scoring {name} on val (eta grid {s.eta_grid})")
    report = _evaluate(
        [ckpt],
        db,
        stage / "val",
        eta_grid=s.eta_grid,
        fire_steps=1,  # ASE FIRE is not part of this stage
    )
    entry = report["checkpoints"][0]
    selected = entry["fixed_step_selected"]
    result = {
        "checkpoint": str(ckpt),
        "options": s.pretrain_variants[name],
        "force_mae": entry["forces"]["mae"],
        "force_rmse": entry["forces"]["rmse"],
        "force_mae_per_kind": force_mae_per_kind(load_model(ckpt, device="cpu", dtype=torch.float32), db, "val"),
        "eta": selected["eta"],
        "fixed_step": _dq_entry(selected),
    }
    log(
        f"  {name}: val force MAE {result['force_mae']:.4g} eV/A, val Dq {result['fixed_step']['mean']:.4g} "
        f"at eta {result['eta']:g} " + _kinds_text(result["fixed_step"]["per_kind"])
    )
    _save_json(path, result)
    return result


def stage_pretrain(db, out: Path, s: Settings, seed: int, log: Log) -> dict[str, Any]:
    return {name: pretrained(db, out, s, name, seed, log) for name in s.pretrain_variants}


def tuned(db, out: Path, s: Settings, name: str, init: str, options: dict, seed: int, log: Log) -> tuple[Path, dict]:
    """Run (when missing) one BPTT variant from the pretrained ``init``; returns its checkpoint and pretrained info."""
    pre = pretrained(db, out, s, init, seed, log)
    stage = out / "bptt" / name
    stage.mkdir(parents=True, exist_ok=True)
    ckpt = stage / "bptt.pt"
    if not ckpt.exists():
        cfg = {**s.finetune, **options, "device": "cpu", "seed": seed}
        log(f"BPTT {name} from {init} ({cfg['max_batches']} optimiser steps): {options}")
        finetune(db, ckpt, init=pre["checkpoint"], config=finetune_config("paper", **cfg), progress=False)
    return ckpt, pre


def bptt_variant(db, out: Path, s: Settings, name: str, seed: int, log: Log) -> dict[str, Any]:
    init, options = s.bptt_variants[name]
    ckpt, pre = tuned(db, out, s, name, init, options, seed, log)
    path = ckpt.parent / "val.json"
    if (done := _load_json(path)) is not None:
        return done
    # The pretrained model's val-best fixed step comes from the pretrain stage; the grid here is only
    # that eta, since the tuned model is scored with its own step rule.
    report = _evaluate(
        [ckpt],
        db,
        ckpt.parent / "val",
        eta_grid=(pre["eta"],),
        fire_steps=1,
    )
    entry = report["checkpoints"][0]
    own = _dq_entry(entry["own_rule"])
    ck = load_checkpoint(ckpt)
    result = {
        "init": init,
        "options": options,
        "checkpoint": str(ckpt),
        "exported": ((ck.get("metadata") or {}).get("no_harm") or {}).get("exported", "tuned"),
        "rule": entry["own_rule"].get("rule"),
        "own_rule": own,
        "pretrained_fixed_step": pre["fixed_step"],
        "ratio": ratio(own["mean"], pre["fixed_step"]["mean"]),
        "ratio_per_kind": _per_kind_ratio(own, pre["fixed_step"]),
        "force_mae": entry["forces"]["mae"],
        "pretrained_force_mae": pre["force_mae"],
        "history_val_dq": [h.get("val_dq") for h in (entry.get("history") or []) if isinstance(h, dict)],
    }
    log(
        f"  BPTT {name}: val Dq {own['mean']:.4g} ({fmt(result['ratio'], 3)}x pretrained fixed step) ratio per kind "
        + _kinds_text(result["ratio_per_kind"])
        + f", val force MAE {fmt(result['force_mae'], 3)} eV/A"
    )
    _save_json(path, result)
    return result


def stage_bptt(db, out: Path, s: Settings, seed: int, log: Log) -> dict[str, Any]:
    return {name: bptt_variant(db, out, s, name, seed, log) for name in s.bptt_variants}


def stage_fire(db, out: Path, s: Settings, seed: int, log: Log) -> dict[str, Any]:
    init, options = s.fire
    ckpt, pre = tuned(db, out, s, "fire", init, options, seed, log)
    path = ckpt.parent / "val.json"
    if (done := _load_json(path)) is not None:
        return done
    log(f"ASE FIRE (fmax {s.fire_fmax:g}, {s.fire_steps} steps) with the pretrained and the FIRE-tuned model on val")
    report = _evaluate(
        [pre["checkpoint"], ckpt],
        db,
        ckpt.parent / "val",
        eta_grid=(pre["eta"],),
        fire_fmax=s.fire_fmax,
        fire_steps=s.fire_steps,
        names=["pretrained", "fire-tuned"],
    )
    before, after = (_dq_entry(c["fire"]) for c in report["checkpoints"])
    result = {
        "init": init,
        "options": options,
        "checkpoint": str(ckpt),
        "exported": ((load_checkpoint(ckpt).get("metadata") or {}).get("no_harm") or {}).get("exported", "tuned"),
        "fire_fmax": s.fire_fmax,
        "fire_steps": s.fire_steps,
        "pretrained_fire": before,
        "tuned_fire": after,
        "ratio": ratio(after["mean"], before["mean"]),
        "ratio_per_kind": _per_kind_ratio(after, before),
    }
    log(
        f"  ASE FIRE: pretrained val Dq {before['mean']:.4g}, FIRE-tuned {after['mean']:.4g} "
        f"({fmt(result['ratio'], 3)}x) " + _kinds_text(result["ratio_per_kind"])
    )
    _save_json(path, result)
    return result


# ------------------------------------------------------------------ summary
def summary(results: dict[str, Any]) -> str:
    st = results["stages"]
    lines = [
        "# What limits BPTT's gain on interstitials (val split only)",
        "",
        f"Made by `{results['command']}`. Every number is computed on the VAL split (the test split is never read);",
        "Dq in amu^1/2 A, mean per kind, forces in eV/A.",
        "",
    ]
    short = [k.replace("interstitial-", "") for k in KINDS]
    if "oracle" in st:
        o = st["oracle"]
        lines += [
            "## Oracle: the fixed step with the reference (Stillinger-Weber) forces",
            "",
            table(
                ["eta", "mean", *short, "frames"],
                [
                    [float(e), v["mean"], *[v["per_kind"][k] for k in KINDS], v["frames_mean"]]
                    for e, v in o["etas"].items()
                ],
            ),
            "",
        ]
    if "pretrain" in st:
        rows = [
            [name, p["force_mae"], p["force_rmse"], p["eta"], p["fixed_step"]["mean"]]
            + [p["fixed_step"]["per_kind"][k] for k in KINDS]
            for name, p in st["pretrain"].items()
        ]
        lines += [
            "## Pretrained models: force errors and the val-best fixed step",
            "",
            table(["model", "force MAE", "force RMSE", "eta", "Dq", *short], rows),
            "",
            "Force MAE per kind:",
            "",
            table(
                ["model", *short],
                [[n, *[p["force_mae_per_kind"][k] for k in KINDS]] for n, p in st["pretrain"].items()],
            ),
            "",
        ]
    if "bptt" in st:
        rows = [
            [name, b["exported"], b["own_rule"]["mean"], b["ratio"]]
            + [b["ratio_per_kind"][k] for k in KINDS]
            + [b["force_mae"]]
            for name, b in st["bptt"].items()
        ]
        lines += [
            "## BPTT: own step rule, ratio to the pretrained model's val-best fixed step",
            "",
            "The no-harm rule of `finetune` exports the pretrained model (with its best fixed step) when the tuned",
            "one is no better on val; `exported` says which model a row scores.",
            "",
            table(["run", "exported", "Dq", "ratio", *[f"{k} ratio" for k in short], "force MAE"], rows),
            "",
        ]
    if "fire" in st:
        f = st["fire"]
        lines += [
            "## BPTT through FIRE, then ASE FIRE",
            "",
            table(
                ["exported", "pretrained + ASE FIRE", "tuned + ASE FIRE", "ratio", *[f"{k} ratio" for k in short]],
                [
                    [f["exported"], f["pretrained_fire"]["mean"], f["tuned_fire"]["mean"], f["ratio"]]
                    + [f["ratio_per_kind"][k] for k in KINDS]
                ],
            ),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("interstitial-limits"), help="output directory (reused)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage (8-site cells, few steps)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma separated, of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the splits, pretraining and BPTT")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    if not stages or any(x not in STAGES for x in stages):
        parser.error(f"--stages takes a comma-separated subset of {', '.join(STAGES)}")
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log()

    db = build_db(out, s, args.seed, log)
    for name in stages:
        if name == "oracle":
            stage_oracle(db, out, s, log)
        else:
            {"pretrain": stage_pretrain, "bptt": stage_bptt, "fire": stage_fire}[name](db, out, s, args.seed, log)

    # Collect every finished stage (also those of earlier runs in this directory).
    found: dict[str, Any] = {}
    if (o := _load_json(out / "oracle.json")) is not None:
        found["oracle"] = o
    for stage, names in (("pretrain", s.pretrain_variants), ("bptt", s.bptt_variants)):
        done = {n: _load_json(out / stage / n / "val.json") for n in names}
        if any(v is not None for v in done.values()):
            found[stage] = {n: v for n, v in done.items() if v is not None}
    if (f := _load_json(out / "bptt" / "fire" / "val.json")) is not None:
        found["fire"] = f
    results = {
        "command": "python -m studies.interstitial_limits " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": {
            "quick": args.quick,
            "seed": args.seed,
            "threads": args.threads,
            "database": str(db.name),
            "counts": {k: len(db.trajectories(split=k)) for k in ("train", "val", "test")},
            "kinds": list(KINDS),
            "pretrain": s.pretrain,
            "finetune": s.finetune,
            "eta_grid": list(s.eta_grid),
            "oracle_etas": list(s.oracle_etas),
            "split_scored": "val",
        },
        "stages": found,
        "wall_s_this_run": round(log.elapsed, 1),
        "cpu_count": os.cpu_count(),
    }
    _save_json(out / "results.json", results)
    (out / "summary.md").write_text(summary(results) + "\n")
    log(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    return results


if __name__ == "__main__":
    main()

"""The trade-off between relaxation quality (Dq) and force accuracy under BPTT's force term.

    python -m studies.force_tradeoff --out tradeoff                 # the full curve (not run in the tests)
    python -m studies.force_tradeoff --out /tmp/t --quick           # a smoke run (tests/test_force_tradeoff.py)

BPTT alone makes the tuned model a worse force field (docs/results.md). The
force-matching term of the BPTT loss (``FinetuneConfig.force_weight``, in
amu^1/2 A per (eV/A)^2) pulls it back. This script measures what that costs:

1. Data: the built-in ``si-defects`` recipe at random sites (the demo's four
   defect kinds), splits train / val / test; or ``--db`` with splits assigned.
2. One pretrained model (force matching; or ``--pretrained``).
3. For every weight of ``--weights``: BPTT from that model with the same
   seed and the same budget in optimiser steps (``--steps``). Each
   checkpoint is the one ``finetune`` exports (the no-harm rule may export the
   pretrained model; ``results.json`` says when, and scores the best tuned
   weights from the state file as well, ``tuned_val``).
4. Choices on val only: each model's mean val Dq with its own fixed step rule
   and its force MAE on the val frames; the pretrained model at its best fixed
   step on val. The chosen weight has the smallest val Dq among those whose
   val force MAE is at most ``--force-tolerance`` (1.5) times the pretrained
   model's; when none is, the smallest val Dq, and the results say so.
5. The test split, once: the chosen model and the pretrained model at its
   val-chosen step (Dq and force MAE).
6. ``results.json`` and ``tradeoff.png`` (val Dq against val force MAE, one
   point per weight, the pretrained model marked) in ``--out``.

Every number comes from this run; nothing is typed in. Budgets are optimiser
steps, so a seed gives the same numbers at any machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ase_bptt.data.datasets import load_frames, load_relaxations
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.relax.steps import FixedStep, rule_from_relax_settings
from ase_bptt.runs.distributed import DistContext
from ase_bptt.runs.state import load_state, state_path
from ase_bptt.train.export import pretrained_relaxations, relax_scores
from ase_bptt.train.finetune import finetune
from ase_bptt.train.presets import finetune_config, pretrain_config
from ase_bptt.train.pretrain import force_metrics, pretrain
from ase_bptt.train.rollouts import evaluate_rollouts
from ase_bptt.workflows.demo import DEMO_DEFECTS


@dataclass
class Settings:
    """Sizes and budgets of one run (``FULL`` or ``QUICK``)."""

    n_trajectories: int
    val: float
    test: float
    generate: dict[str, Any]
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    weights: tuple[float, ...]
    eta_grid: tuple[float, ...]
    force_frames: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


_MODEL = {"d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}

#: The demo's data and budgets (ase_bptt/workflows/demo.py FULL), one BPTT run per weight.
FULL = Settings(
    n_trajectories=120,
    val=0.15,
    test=0.15,
    generate={"defects": DEMO_DEFECTS, "site": "random"},
    pretrain={"model": _MODEL, "epochs": 1000, "max_steps": 5000, "batch_size": 16, "lr": 2e-3, "patience": None},
    finetune={"epochs": 1000, "max_batches": 600, "lr": 5e-4, "batch_size": 4, "grid_structures": 32},
    weights=(0.0, 0.3, 1.0, 3.0, 10.0),
    eta_grid=(0.005, 0.01, 0.02, 0.035, 0.05, 0.065, 0.08, 0.1, 0.15),
)

#: 8-site cells and a handful of steps: every stage in a few seconds.
QUICK = Settings(
    n_trajectories=8,
    val=0.25,
    test=0.25,
    generate={"defects": ("vacancy", "interstitial-tetrahedral"), "site": "random", "size": 1, "fmax": 0.03},
    pretrain={
        "model": {"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2},
        "epochs": 100,
        "max_steps": 20,
        "batch_size": 16,
        "lr": 2e-3,
        "patience": None,
        "eval_frames": 64,
    },
    finetune={"epochs": 100, "max_batches": 2, "batch_size": 2, "max_steps": 10, "grid_structures": 4},
    weights=(0.0, 1.0, 10.0),
    eta_grid=(0.02, 0.05),
    force_frames=8,
)


# ------------------------------------------------------------------ helpers
def _echo(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {text}", flush=True)


def _scores(model, relax: dict, relaxations, frames, *, batch_size: int = 16) -> dict[str, float]:
    """Mean Dq of ``model`` with the step rule of ``relax`` and its force MAE/RMSE on ``frames``."""
    ctx = DistContext()
    rule, tol, max_steps = rule_from_relax_settings(dict(relax))
    param = next(model.parameters())
    rule = rule.to(device=param.device, dtype=param.dtype)
    rolled = evaluate_rollouts(model, rule, relaxations, tol=tol, max_steps=max_steps, batch_size=batch_size, ctx=ctx)
    forces = force_metrics(model, frames, torch.arange(len(frames)), batch_size=batch_size, ctx=ctx)
    return {
        "dq": rolled["dq"],
        "frames": rolled["frames"],
        "force_mae": forces["force_mae"],
        "force_rmse": forces["force_rmse"],
    }


def choose(points: list[dict[str, Any]], pretrained_force_mae: float, tolerance: float) -> tuple[dict, str]:
    """The weight chosen on val: the smallest val Dq with force MAE <= tolerance x the pretrained one's.

    Returns ``(point, how)``; ``how`` says whether the force limit held or the
    smallest Dq had to be taken without it.
    """
    limit = tolerance * pretrained_force_mae
    finite = [p for p in points if math.isfinite(p["val"]["dq"])]
    eligible = [p for p in finite if p["val"]["force_mae"] <= limit]
    if eligible:
        best = min(eligible, key=lambda p: (p["val"]["dq"], p["weight"]))
        return (
            best,
            f"smallest val Dq among weights with val force MAE <= {tolerance:g} x pretrained ({limit:.4g} eV/A)",
        )
    best = min(finite or points, key=lambda p: (p["val"]["dq"], p["weight"]))
    return best, (
        f"no weight kept the val force MAE within {tolerance:g} x pretrained ({limit:.4g} eV/A): "
        "chose the smallest val Dq without that limit"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """``tradeoff.png``: val Dq against val force MAE, one point per weight, the pretrained model marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    pts = results["points"]
    xs, ys = [p["tuned_val"]["force_mae"] for p in pts], [p["tuned_val"]["dq"] for p in pts]
    ax.plot(xs, ys, "o-", color="C0", label="BPTT (best weights of each run)")
    for p, x, y in zip(pts, xs, ys):
        ax.annotate(f"w={p['weight']:g}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    lost = [p for p in pts if p["exported"] == "pretrained"]
    if lost:
        ax.scatter(
            [p["tuned_val"]["force_mae"] for p in lost],
            [p["tuned_val"]["dq"] for p in lost],
            marker="x",
            s=80,
            color="C1",
            zorder=4,
            label="not exported: no better than pretrained (no-harm rule)",
        )
    pre = results["pretrained"]["val"]
    ax.scatter(
        [pre["force_mae"]], [pre["dq"]], marker="*", s=220, color="C3", zorder=5, label="pretrained, best fixed step"
    )
    ax.axvline(
        results["force_limit"],
        color="grey",
        ls="--",
        lw=1,
        label=f"{results['force_tolerance']:g} x pretrained force MAE",
    )
    chosen = next(p for p in pts if p["weight"] == results["chosen"]["weight"])
    ax.scatter(
        [chosen["val"]["force_mae"]],
        [chosen["val"]["dq"]],
        s=260,
        facecolors="none",
        edgecolors="k",
        lw=2,
        label=f"chosen on val (w={chosen['weight']:g}, as exported)",
    )
    ax.set_xlabel("force MAE on the val frames (eV/A)")
    ax.set_ylabel("mean Dq on val, own fixed step (amu$^{1/2}$ A)")
    ax.set_title("BPTT force-term weight: relaxation vs force accuracy (val)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("force-tradeoff"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, splits, pretraining and BPTT")
    parser.add_argument("--weights", type=str, default=None, help="force weights, comma separated")
    parser.add_argument("--steps", type=int, default=None, help="BPTT optimiser steps per weight")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining optimiser steps")
    parser.add_argument("--force-frames", type=int, default=None, help="reference frames per BPTT step")
    parser.add_argument("--force-tolerance", type=float, default=1.5, help="allowed val force MAE / pretrained's")
    parser.add_argument("--db", type=Path, default=None, help="use this database (splits assigned) instead")
    parser.add_argument("--pretrained", type=Path, default=None, help="use this pretrained checkpoint instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    weights = tuple(float(w) for w in args.weights.split(",")) if args.weights else s.weights
    if any(not (w >= 0 and math.isfinite(w)) for w in weights) or not weights:
        parser.error("--weights must be finite numbers >= 0")
    steps = args.steps or s.finetune["max_batches"]
    force_frames = args.force_frames or s.force_frames
    if steps < 1 or force_frames < 1 or not args.force_tolerance > 0:
        parser.error("--steps and --force-frames must be >= 1 and --force-tolerance > 0")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common = {"device": args.device, "seed": args.seed}

    # 1. data
    if args.db is not None:
        db = TrajectoryDB(args.db, create=False)
        _echo(t0, f"database {args.db}")
    else:
        from ase_bptt.data.generate import generate

        db = TrajectoryDB(out / "si.db", create=True)
        _echo(t0, f"generating {s.n_trajectories} si-defects relaxations (random sites) into {out / 'si.db'}")
        generate("si-defects", db, n=s.n_trajectories, seed=args.seed, progress=False, **s.generate)
        db.assign_splits(val=s.val, test=s.test, seed=args.seed)
    val = load_relaxations(db, "val")
    test = load_relaxations(db, "test")
    val_frames, test_frames = load_frames(db, "val"), load_frames(db, "test")
    if val is None or test is None or val_frames is None or test_frames is None:
        sys.exit("the database needs converged val and test trajectories")
    dtype = torch.float32
    val, test = val.to(args.device, dtype), test.to(args.device, dtype)
    val_frames, test_frames = val_frames.to(args.device, dtype), test_frames.to(args.device, dtype)

    # 2. pretrained model
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = out / "pretrained.pt"
        pre_cfg = dict(s.pretrain)
        if args.pretrain_steps:
            pre_cfg["max_steps"] = args.pretrain_steps
        _echo(t0, f"pretraining ({pre_cfg['max_steps']} optimiser steps) -> {pretrained}")
        pretrain(db, pretrained, config=pretrain_config("paper", **pre_cfg, **common), progress=False)

    # 3. one BPTT run per weight, same seed and budget
    base = finetune_config("paper", **{**s.finetune, "max_batches": steps}, eta_grid=s.eta_grid, **common)
    pre_model = load_model(pretrained, device=args.device, dtype=dtype)
    fixed = {k: r for k, r in pretrained_relaxations(base).items() if k != "fire"}
    scores = relax_scores(pre_model, fixed, val, loss=base.loss, batch_size=base.eval_batch_size, ctx=DistContext())
    val_curve = {repr(fixed[k]["step"]["eta"]): v for k, v in scores.items()}
    if not any(math.isfinite(v) for v in scores.values()):
        sys.exit("every step size of the grid diverged with the pretrained model")
    eta = fixed[min(scores, key=scores.get)]["step"]["eta"]
    pre_relax = {"step": FixedStep(eta, maxstep=base.maxstep).to_dict(), "tol": base.tol, "max_steps": base.max_steps}
    pre_val = _scores(pre_model, pre_relax, val, val_frames)
    _echo(t0, f"pretrained on val: Dq {pre_val['dq']:.4g} (eta {eta:g}), force MAE {pre_val['force_mae']:.4g} eV/A")
    points = []
    for w in weights:
        path = out / f"bptt-w{w:g}.pt"
        config = replace(base, force_weight=w, force_frames=force_frames)
        _echo(t0, f"BPTT with force_weight {w:g} ({steps} optimiser steps) -> {path}")
        finetune(db, path, init=pretrained, config=config, progress=False)
        ckpt = load_checkpoint(path)
        model = load_model(ckpt, device=args.device, dtype=dtype)
        scores = _scores(model, ckpt["relax"], val, val_frames)
        no_harm = ckpt["metadata"].get("no_harm") or {}
        point = {"weight": w, "checkpoint": str(path), "exported": no_harm.get("exported", "tuned"), "val": scores}
        point["tuned_val"] = scores
        if point["exported"] == "pretrained":  # the no-harm rule exported the pretrained model: score the tuned one too
            state = load_state(state_path(path))
            tuned = load_model(pretrained, device=args.device, dtype=dtype)
            tuned.load_state_dict(state["best_model"])
            relax = {"step": state["best_rule"], "tol": base.tol, "max_steps": base.max_steps}
            point["tuned_val"] = _scores(tuned, relax, val, val_frames)
        points.append(point)
        _echo(
            t0,
            f"  val: Dq {scores['dq']:.4g}, force MAE {scores['force_mae']:.4g} eV/A (exported: {point['exported']}; "
            f"best tuned weights: Dq {point['tuned_val']['dq']:.4g}, force MAE {point['tuned_val']['force_mae']:.4g})",
        )

    # 4. the choice, on val only
    chosen, how = choose(points, pre_val["force_mae"], args.force_tolerance)
    _echo(t0, f"chosen on val: force_weight {chosen['weight']:g} ({how})")

    # 5. the test split, once
    ckpt = load_checkpoint(chosen["checkpoint"])
    chosen_test = _scores(load_model(ckpt, device=args.device, dtype=dtype), ckpt["relax"], test, test_frames)
    pre_test = _scores(pre_model, pre_relax, test, test_frames)
    _echo(
        t0,
        f"test: chosen Dq {chosen_test['dq']:.4g}, force MAE {chosen_test['force_mae']:.4g} eV/A; "
        f"pretrained (best fixed step on val) Dq {pre_test['dq']:.4g}, force MAE {pre_test['force_mae']:.4g} eV/A",
    )

    results = {
        "command": "python -m studies.force_tradeoff " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": {
            "quick": args.quick,
            "seed": args.seed,
            "weights": list(weights),
            "bptt_steps": steps,
            "force_frames": force_frames,
            "finetune": base.to_dict(),
            "database": str(db.name),
            "pretrained": str(pretrained),
            "counts": {k: len(db.trajectories(split=k)) for k in ("train", "val", "test")},
        },
        "pretrained": {"eta": eta, "val_eta_curve": val_curve, "val": pre_val, "test": pre_test},
        "points": points,
        "force_tolerance": args.force_tolerance,
        "force_limit": args.force_tolerance * pre_val["force_mae"],
        "chosen": {"weight": chosen["weight"], "how": how, "val": chosen["val"], "test": chosen_test},
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_count": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    plot(results, out / "tradeoff.png")
    _echo(t0, f"wrote {out / 'results.json'} and {out / 'tradeoff.png'}")
    return results


if __name__ == "__main__":
    main()

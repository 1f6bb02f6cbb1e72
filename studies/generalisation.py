"""Does BPTT fine-tuning help on defect kinds and elements the model never saw?

    python -m studies.generalisation --protocol loeo --out gen-loeo             # six groups (lead's run)
    python -m studies.generalisation --protocol loko --out gen-loko
    python -m studies.generalisation --protocol random --out gen-random         # the in-distribution control
    python -m studies.generalisation --protocol loeo --groups Pd --quick --out /tmp/g  # smoke run, ~30 s
    python -m studies.generalisation --protocol random --model adapt-mi --threads 1 --out gen  # ADAPT-MI

``--model adapt-mi`` trains the translation-invariant ADAPT-MI with its own budgets
(``ADAPT_MI`` below; the 108-site cells are wide enough for its 5 A cutoff, the
``--quick`` cells are not), ``--force-weight`` adds the force-matching term,
``--proximal`` the pull towards the pretrained weights, ``--freeze`` the parameters BPTT leaves alone, ``--energy-weight`` the
per-atom energy match on the force term's frames, ``--label-weight`` weights
the Dq of some labels (e.g. ``'sub:??=3'``: single substitutions), and ``--step fire``
tunes through the differentiable FIRE (tol 1e-5) instead of the fixed step.

Data: the built-in ``fcc-defects`` recipe (a Cu host with vacancies, divacancies,
and Ni, Pd, Ag, Pt, Au, Al substitutions, interstitials and pairs, EMT reference),
generated once into ``--out/pool.db``. Each group of the protocol gets a copy of
it with its own splits (:meth:`TrajectoryDB.assign_splits` with a
:class:`~ase_bptt.data.splits.HoldOut`):

- ``loeo`` (leave one element out): every structure containing the element is
  test; the element occurs in no train or val structure.
- ``loko`` (leave one kind out): every structure of the kind (``vacancy``,
  ``divacancy``, ``sub``, ``int``, ``sub+vacancy``, ``sub+sub``; a kind is the
  label with its elements removed) is test.
- ``random``: one group, a random test fraction (the in-distribution control).

The other structures are split into val (``--val``) and train by the usual hash;
train is cut to ``--n-train`` (the first by traj_id) so every group trains on the
same amount. Per group, on that copy: pretraining (force matching; train and val
only), the BPTT step chosen on val, BPTT fine-tuning, and one evaluation on the
held-out test group (ASE FIRE and the best fixed step with eta chosen on val, both
with the pretrained model, and the BPTT model with its own rule). Budgets are
optimiser steps (``--pretrain-steps``, ``--bptt-steps``), so a seed gives the same
numbers on any machine. Writes ``results.json`` and ``summary.md`` to ``--out``.
``--out`` is reused: the pool, each group's database, checkpoints and evaluation
are kept, not redone (delete a group's folder to redo it with other settings).

The model is told every element of the recipe (``species``) before training:
ADAPT describes an atom by its element's descriptors, so a held-out element is
one it can represent but never saw in training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import torch
from ase.data import atomic_numbers

from ase_bptt.cli.options import parse_label_weights
from ase_bptt.data.datasets import load_relaxations
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import generate
from ase_bptt.data.recipes import RECIPES
from ase_bptt.data.splits import HoldOut
from ase_bptt.evaluation.pipeline import evaluate
from ase_bptt.models.checkpoint import load_model
from ase_bptt.runs.config import ConfigError
from ase_bptt.train.finetune import FinetuneConfig, finetune, freeze_parameters
from ase_bptt.train.presets import finetune_config, pretrain_config
from ase_bptt.train.pretrain import build_model, pretrain
from studies.common import Log, eta_curve, fmt, model_options, stable_eta, table

ELEMENTS = tuple(RECIPES["fcc-defects"].defaults["elements"])  # Ni, Pd, Ag, Pt, Au, Al
#: The model may meet every element of the recipe: ADAPT describes an element by its
#: physical descriptors (ase_bptt.elements), so a held-out element is a new point in a
#: space it knows, not an unknown token. Without this its species guard refuses it.
SPECIES = sorted(atomic_numbers[e] for e in (RECIPES["fcc-defects"].defaults["host"], *ELEMENTS))
KINDS = ("vacancy", "divacancy", "sub", "int", "sub+vacancy", "sub+sub")
PROTOCOLS = ("loeo", "loko", "random")


@dataclass
class Settings:
    """Sizes and budgets of one run (``FULL`` or ``QUICK``)."""

    n_train: int = 120
    val: float = 0.15
    random_test: float = 1 / 6
    recipe_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 64, "d_ff": 128, "n_layers": 3, "n_heads": 4})
    pretrain_steps: int = 6000
    pretrain: dict[str, Any] = field(default_factory=lambda: {"batch_size": 16, "lr": 1e-3, "patience": None})
    bptt_steps: int = 600
    finetune: dict[str, Any] = field(default_factory=lambda: {"lr": 5e-4, "batch_size": 4})
    eta_slack: float = 0.05
    eta_grid: tuple[float, ...] = (0.005, 0.01, 0.02, 0.035, 0.05, 0.065, 0.08, 0.1, 0.15)
    fire_steps: int = 300
    workers: int = 2
    seed: int = 0


FULL = Settings()
QUICK = Settings(
    n_train=8,
    val=0.25,
    random_test=0.3,
    recipe_options={"size": 2, "fmax": 0.04},  # 32-site cells, looser reference relaxations
    model={"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2},
    pretrain_steps=6,
    bptt_steps=2,
    finetune={"lr": 1e-4, "batch_size": 4, "max_steps": 10},
    eta_grid=(0.02, 0.05),
    fire_steps=20,
    workers=1,
)


#: ``--model adapt-mi``: the translation-invariant ADAPT-MI (models/mi_attention.py), as in
#: reproduce_paper.py; about 4x ADAPT per frame, so 3000 pretraining and 150 BPTT steps of
#: 4 relaxations, val scored every 15 steps and the best kept.
ADAPT_MI = {
    "model": {"model_name": "adapt-mi", "d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4},
    "pretrain_steps": 3000,
    "pretrain": {"batch_size": 16, "lr": 2e-3, "patience": None},
    "bptt_steps": 150,
    "finetune": {"lr": 5e-4, "batch_size": 4, "eval_every": 15},
}


def kind_of(label: str) -> str:
    """``sub:Ni+vacancy`` -> ``sub+vacancy``: the label without its elements."""
    return re.sub(r":[A-Z][a-z]?", "", label)


def pool_size(s: Settings) -> int:
    # Enough that a group whose hold-out takes a quarter of the pool still has n_train left after val.
    return math.ceil(s.n_train / (1 - s.val) / 0.75) + 1


def hold_outs(protocol: str, labels: set[str]) -> dict[str, HoldOut | None]:
    """The groups of a protocol: name -> hold-out (None: the random control)."""
    if protocol == "loeo":
        return {e: HoldOut("element", (e,)) for e in ELEMENTS}
    if protocol == "loko":
        groups = {}
        for kind in KINDS:
            members = tuple(sorted(lab for lab in labels if kind_of(lab) == kind))
            groups[kind] = HoldOut("label", members) if members else HoldOut("label", (kind,))
        return groups
    return {"random": None}


def group_db(pool: TrajectoryDB, out: Path, name: str, hold: HoldOut | None, s: Settings) -> TrajectoryDB:
    """A copy of the pool with this group's splits; train cut to ``n_train`` trajectories."""
    path = out / name / "fcc.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        shutil.copyfile(pool.name, tmp)
        db = TrajectoryDB(tmp, create=False)
        test = s.random_test if hold is None else 0.0
        db.assign_splits(val=s.val, test=test, seed=s.seed, hold_out=hold, reassign=True)
        splits = [split for _, split, _ in db.split_info().values()]
        for needed in ("train", "val", "test"):
            if needed not in splits:
                raise ValueError(f"the {needed} split of group {name} is empty ({len(splits)} in the pool)")
        train = sorted(t for t, (_, split, _) in db.split_info().items() if split == "train")
        db.remove_trajectories(train[s.n_train :])
        os.replace(tmp, path)
    db = TrajectoryDB(path, create=False)
    if hold is not None:  # the package checks this; the example says it too
        for t, (label, split, elements) in db.split_info().items():
            assert split == "test" or not hold.matches(label, elements), (name, t)
    return db


def bptt_config(s: Settings, eta_bptt: float) -> FinetuneConfig:
    """The group's BPTT run: the fixed step starts at the val-chosen eta; ``--step fire`` sets step
    "fire" and eta None in ``s.finetune``, which wins."""
    return finetune_config(
        "paper",
        **{"epochs": 100000, "eta": eta_bptt, "step": "fixed", **s.finetune, "max_batches": s.bptt_steps},
        seed=s.seed,
        device="cpu",
    )


def run_group(db: TrajectoryDB, gdir: Path, s: Settings, log: Log) -> dict[str, Any]:
    counts = split_counts(db)
    log(f"    splits: {counts}")
    pre = gdir / "pretrained.pt"
    if not pre.exists():
        cfg = pretrain_config(
            "paper",
            **{"epochs": 100000, **s.pretrain, "max_steps": s.pretrain_steps},
            model={**s.model, "species": SPECIES},
            seed=s.seed,
            device="cpu",
        )
        pretrain(db, pre, config=cfg, progress=False)
    max_steps = s.finetune.get("max_steps", 75)
    curve = eta_curve(load_model(pre), load_relaxations(db, "val"), s.eta_grid, metric="dq", max_steps=max_steps)
    eta_bptt = stable_eta(curve, s.eta_slack)
    bptt, cfg = gdir / "bptt.pt", bptt_config(s, eta_bptt)
    if not bptt.exists():
        finetune(db, bptt, init=pre, config=cfg, progress=False)
    cached = gdir / "eval" / "report.json"
    if cached.exists() and cached.stat().st_mtime > bptt.stat().st_mtime:
        log("    test: reusing the evaluation (the test group is evaluated once)")
        res = json.loads(cached.read_text())
    else:
        log("    test: evaluating (first and only time)")
        res = evaluate(
            [pre, bptt],
            db,
            gdir / "eval",
            split="test",
            select_eta_on="val",
            eta_grid=s.eta_grid,
            fire_steps=s.fire_steps,
            max_steps=max_steps,
            names=["pretrained", "BPTT"],
            device="cpu",
            progress=False,
            plots=False,  # report.md and report.json; the summary is this script's figure
        )
    return {
        "splits": counts,
        "val_eta_curve": curve,
        "eta_bptt": eta_bptt if cfg.step == "fixed" else None,  # FIRE has no eta
        "report": str(gdir / "eval" / "report.md"),
        **test_numbers(res),
    }


def test_numbers(res: dict[str, Any]) -> dict[str, Any]:
    """A group's test numbers from its evaluation report: overall, per kind, force MAE."""
    by_name = {ck["name"]: ck for ck in res["checkpoints"]}
    fire = by_name["pretrained"]["fire"]["dq"]["mean"]
    fixed_entry = by_name["pretrained"]["fixed_step_selected"]
    own = by_name["BPTT"]["own_rule"]["dq"]["mean"]
    fixed = fixed_entry["dq"]["mean"]
    kinds: dict[str, dict[str, float]] = {}
    for label, n in res["label_counts"].items():  # label means weighted by their counts
        k = kinds.setdefault(kind_of(label), {"n": 0, "fixed": 0.0, "bptt": 0.0})
        k["n"] += n
        k["fixed"] += n * fixed_entry["dq"]["per_label"][label]["mean"]
        k["bptt"] += n * by_name["BPTT"]["own_rule"]["dq"]["per_label"][label]["mean"]
    per_kind = {
        kind: {"n": k["n"], "fixed": k["fixed"] / k["n"], "bptt": k["bptt"] / k["n"], "ratio": k["bptt"] / k["fixed"]}
        for kind, k in sorted(kinds.items())
    }
    forces = {name: by_name[name]["forces"]["mae"] for name in ("pretrained", "BPTT")}
    return {
        "test_labels": res["label_counts"],
        "n": res["n_structures"],
        "eta_fixed": fixed_entry["eta"],
        "dq": {"do_nothing": res["do_nothing"]["dq"]["mean"], "fire": fire, "fixed": fixed, "bptt": own},
        "bptt_over_fixed": own / fixed,
        "bptt_over_fire": own / fire,
        "per_kind": per_kind,
        "force_mae": {**forces, "ratio": forces["BPTT"] / forces["pretrained"]},
    }


def summary(results: dict[str, Any]) -> str:
    rows = []
    for name, g in results["groups"].items():
        if "skipped" in g:
            rows.append([name, g["skipped"], None, None, None, None, 0])
            continue
        d, f = g["dq"], g["force_mae"]
        rows.append(
            [name, g["held_out"], d["bptt"], d["fixed"], g["bptt_over_fixed"], g["bptt_over_fire"], f["ratio"], g["n"]]
        )
    head = [
        "group",
        "held out",
        "BPTT Dq",
        "best fixed step Dq",
        "BPTT / best fixed step",
        "BPTT / ASE FIRE",
        "force MAE tuned / pretrained",
        "n",
    ]
    title = f"# Generalisation: protocol {results['protocol']}, seed {results['settings']['seed']}"
    note = (
        "Dq (amu^1/2 A) on each group's held-out test structures; the fixed step's eta is chosen on val, "
        "ASE FIRE and the fixed step use the pretrained model."
    )
    ratios = [g["bptt_over_fixed"] for g in results["groups"].values() if "skipped" not in g]
    mean = f"Mean over the groups of BPTT / best fixed step: {fmt(sum(ratios) / len(ratios), 3)}." if ratios else ""
    kinds = sorted({k for g in results["groups"].values() for k in g.get("per_kind", {})})
    kind_rows = [
        [name] + [g["per_kind"][k]["ratio"] if k in g.get("per_kind", {}) else None for k in kinds]
        for name, g in results["groups"].items()
        if "skipped" not in g
    ]
    kind_note = "BPTT / best fixed step per defect kind on each group's test structures (- : none of that kind):"
    return "\n\n".join([title, note, table(head, rows), mean, kind_note, table(["group", *kinds], kind_rows)]) + "\n"


def split_counts(db: TrajectoryDB) -> dict[str, int]:
    splits = [split for _, split, _ in db.split_info().values()]
    return {sp: splits.count(sp) for sp in ("train", "val", "test")}


def write_results(out: Path, results: dict[str, Any]) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = summary(results)
    (out / "summary.md").write_text(text)
    return text


def rewrite_summary(out: Path, protocol: str, seed: int) -> int:
    """summary.md and results.json again from each group's ``eval/report.json`` (the test is not re-run).

    Groups evaluated by a run that was stopped before it wrote ``results.json`` are found by their folders.
    """
    path = out / "results.json"
    fresh = {"protocol": protocol, "settings": {"seed": seed}, "groups": {}}
    results = json.loads(path.read_text()) if path.exists() else fresh
    pool = TrajectoryDB(out / "pool.db", create=False)
    labels = {label for label, _, _ in pool.split_info().values() if label}
    for name, hold in hold_outs(results["protocol"], labels).items():
        report = out / name / "eval" / "report.json"
        if name not in results["groups"] and report.exists():
            counts = split_counts(TrajectoryDB(out / name / "fcc.db", create=False))
            results["groups"][name] = {"held_out": str(hold) if hold else "random", "splits": counts}
    for name, g in results["groups"].items():
        if "skipped" not in g:
            g.update(test_numbers(json.loads((out / name / "eval" / "report.json").read_text())))
    print(write_results(out, results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=PROTOCOLS, default="loeo")
    parser.add_argument("--groups", default=None, help="comma-separated subset of the protocol's groups, e.g. Ni,Pd")
    parser.add_argument("--out", default="generalisation", help="output directory (reused when it exists)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets: a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, splits and training")
    parser.add_argument("--n-train", type=int, default=None, help="train relaxations per group")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining optimiser steps per group")
    parser.add_argument("--bptt-steps", type=int, default=None, help="BPTT optimiser steps per group")
    parser.add_argument(
        "--model", choices=("adapt", "adapt-mi"), default="adapt", help="force model (adapt-mi: smaller budgets)"
    )
    parser.add_argument(
        "--force-weight", type=float, default=None, help="BPTT force-matching weight (finetune --force-weight)"
    )
    parser.add_argument(
        "--step",
        choices=("fixed", "fire"),
        default="fixed",
        help="BPTT step rule (fire: through the differentiable FIRE, tol 1e-5; for ASE FIRE users)",
    )
    parser.add_argument("--proximal", type=float, default=None, help="BPTT proximal weight (finetune --proximal)")
    parser.add_argument(
        "--energy-weight",
        type=float,
        default=None,
        help="BPTT energy-matching weight (finetune --energy-weight; needs --force-weight's frames)",
    )
    parser.add_argument(
        "--label-weight",
        action="append",
        default=[],
        metavar="LABEL=W",
        help="BPTT weight of a label or fnmatch pattern, e.g. 'int:*=3' (repeatable; finetune --label-weight)",
    )
    parser.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="PREFIX",
        help="BPTT keeps parameters named PREFIX* at their pretrained values, e.g. --freeze embed --freeze blocks "
        "(repeatable; finetune --freeze)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite summary.md and results.json from the groups' saved evaluations (no training, no evaluation)",
    )
    args = parser.parse_args(argv)
    if args.summary_only:
        return rewrite_summary(Path(args.out), args.protocol, args.seed)

    torch.set_num_threads(args.threads)
    s = replace(QUICK if args.quick else FULL, seed=args.seed)
    s = model_options(
        s, args.model, args.quick, ADAPT_MI, args.force_weight, args.step, args.proximal, args.energy_weight
    )
    if args.label_weight:
        try:  # the package's own parser of finetune --label-weight
            weights = parse_label_weights(None, None, tuple(args.label_weight))  # type: ignore[arg-type]
        except click.BadParameter as exc:
            parser.error(f"--label-weight: {exc.message}")
        s = replace(s, finetune={**s.finetune, "label_weights": weights})
    if args.freeze:
        try:  # the package's own check, before any pool or model is made
            freeze_parameters(build_model(s.model), tuple(args.freeze), s.finetune.get("step", "fixed"))
        except ConfigError as exc:
            parser.error(f"--freeze: {exc}")
        s = replace(s, finetune={**s.finetune, "freeze": tuple(args.freeze)})
    for key in ("n_train", "pretrain_steps", "bptt_steps"):
        if getattr(args, key) is not None:
            s = replace(s, **{key: getattr(args, key)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log()

    pool = TrajectoryDB(out / "pool.db")
    n_pool = pool_size(s)
    log(f"fcc-defects pool: {n_pool} relaxations (EMT) in {pool.name}")
    generate("fcc-defects", pool, n=n_pool, seed=s.seed, workers=s.workers, progress=False, **s.recipe_options)
    labels = {label for label, _, _ in pool.split_info().values() if label}
    groups = hold_outs(args.protocol, labels)
    if args.groups:
        wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
        unknown = [g for g in wanted if g not in groups]
        if unknown:
            parser.error(f"--groups {','.join(unknown)}: the {args.protocol} groups are {', '.join(groups)}")
        groups = {g: groups[g] for g in wanted}

    text = ""
    results: dict[str, Any] = {"protocol": args.protocol, "quick": args.quick, "settings": asdict(s), "groups": {}}
    for name, hold in groups.items():
        log(f"group {name}: test = {hold if hold else f'a random {s.random_test:.2g} of the pool'}")
        entry: dict[str, Any] = {"held_out": str(hold) if hold else "random"}
        try:
            db = group_db(pool, out, name, hold, s)
        except ValueError as exc:  # HoldOutError (e.g. no structure of the group in the pool) or an empty split
            log(f"    skipped: {exc}")
            entry["skipped"] = str(exc)
        else:
            entry.update(run_group(db, out / name, s, log))
            log(
                f"    BPTT / best fixed step {fmt(entry['bptt_over_fixed'], 3)}, BPTT / ASE FIRE {fmt(entry['bptt_over_fire'], 3)}"
            )
        results["groups"][name] = entry
        results["elapsed_s"] = log.elapsed
        results["log"] = log.lines
        text = write_results(out, results)  # after every group: a stopped run keeps what it finished
    print(text)
    log(f"done in {log.elapsed / 60:.1f} min: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

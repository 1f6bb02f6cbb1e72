"""The demo pipeline behind ``ase-bptt demo`` / ``make demo``.

Generate the built-in silicon point-defect set, assign splits, pretrain a small
ADAPT model by force matching, fine-tune it by BPTT, evaluate both on the test
split and print the Dq table: do nothing / ASE FIRE / best fixed step (eta
chosen on val) / fixed step with eta chosen on test (the paper's "perfect
information" line) / BPTT.

Every stage leaves its product in the output directory and is skipped when
that product is already there (the database is topped up to the target size,
an interrupted training resumes from its state file), so re-running the demo
in the same directory reuses what exists instead of redoing it.

Budgets: the full demo stays under 15 minutes and ``--quick`` under 3 minutes
on a 2-core CPU (measured numbers in the README's "The demo" section).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoSettings", "QUICK", "FULL", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of one demo flavour.

    Attributes:
        n_trajectories: silicon-defect relaxations to generate.
        val, test: split fractions (per trajectory).
        generate_options: extra options of the "si-defects" recipe.
        pretrain: PretrainConfig fields.
        finetune: FinetuneConfig fields.
        eta_grid: fixed step sizes of the evaluation.
        fire_steps: ASE FIRE step limit in the evaluation.
    """

    n_trajectories: int
    val: float
    test: float
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    generate_options: dict[str, Any] = field(default_factory=dict)
    eta_grid: tuple[float, ...] | None = None
    fire_steps: int = 300


#: A small ADAPT: big enough to learn Stillinger-Weber forces roughly, small
#: enough for a 2-core CPU. Epoch counts are what fits the time budgets on an
#: idle 2-core machine, because the learning-rate schedule spans the epochs
#: (a schedule over 200 epochs would still be warming up when the budget ends).
_MODEL = {"d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}

QUICK = DemoSettings(
    n_trajectories=12,
    val=0.25,
    test=0.3,
    # Looser reference relaxations (still converged by the database's 0.05 eV/A): fewer frames.
    generate_options={"fmax": 0.03},
    pretrain={
        "model": _MODEL,
        "epochs": 4,
        "time_budget": 15.0,
        "batch_size": 16,
        "lr": 2e-3,
        "patience": None,
        "eval_frames": 200,
    },
    finetune={"epochs": 1, "time_budget": 15.0, "batch_size": 4, "eta_grid": (0.02, 0.05), "grid_structures": 3},
    eta_grid=(0.01, 0.03, 0.1),
    fire_steps=40,
)

FULL = DemoSettings(
    n_trajectories=100,
    val=0.15,
    test=0.15,
    pretrain={
        "model": _MODEL,
        "epochs": 6,
        "time_budget": 210.0,
        "batch_size": 16,
        "lr": 2e-3,
        "patience": 20,
        "eval_frames": 500,
    },
    finetune={"epochs": 5, "time_budget": 170.0, "batch_size": 4, "grid_structures": 32},
    eta_grid=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
    fire_steps=300,
)


def _stage(echo: Callable[[str], Any], text: str) -> float:
    echo(f"==> {text}")
    return time.perf_counter()


def run_demo(
    out_dir: str | os.PathLike = "demo-out",
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    device: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run (or resume) the demo in ``out_dir`` and print the Dq table.

    Args:
        out_dir: working directory: ``si-defects.db``, ``pretrained.pt``,
            ``bptt.pt`` and ``report/``.
        quick: the small flavour (:data:`QUICK`) instead of :data:`FULL`.
        settings: explicit sizes (overrides ``quick``).
        device, dtype, seed, workers, progress: as for the CLI commands.
        echo: where lines go (``click.echo`` from the CLI).

    Returns:
        ``{"result": evaluate's dict, "table": str, "report": Path,
        "timings": {stage: seconds}, "paths": {...}}``.
    """
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.generate import generate
    from ase_bptt.train.evaluate import evaluate
    from ase_bptt.train.finetune import FinetuneConfig, finetune
    from ase_bptt.train.pretrain import PretrainConfig, pretrain
    from ase_bptt.train.report import demo_rows, format_table

    s = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "db": out / "si-defects.db",
        "pretrained": out / "pretrained.pt",
        "finetuned": out / "bptt.pt",
        "report_dir": out / "report",
    }
    timings: dict[str, float] = {}
    start = time.perf_counter()
    common = {"device": device, "dtype": dtype, "seed": seed}

    db = TrajectoryDB(paths["db"], create=True)
    t = _stage(echo, f"silicon point defects: {s.n_trajectories} relaxations into {paths['db']}")
    # generate() is resumable: it adds only the trajectories not yet in the database.
    added = generate(
        "si-defects", db, n=s.n_trajectories, seed=seed, workers=workers, progress=progress, **s.generate_options
    )
    if not added:
        echo(f"    reusing {len(db)} trajectories")
    counts = db.assign_splits(val=s.val, test=s.test, seed=seed)
    echo("    splits: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    timings["generate"] = time.perf_counter() - t

    t = _stage(echo, f"pretraining (force matching) -> {paths['pretrained']}")
    _resumable(
        echo, pretrain, db, paths["pretrained"], config=PretrainConfig(**s.pretrain, **common), progress=progress
    )
    timings["pretrain"] = time.perf_counter() - t

    t = _stage(echo, f"BPTT fine-tuning -> {paths['finetuned']}")
    _resumable(
        echo,
        finetune,
        db,
        paths["finetuned"],
        init=paths["pretrained"],
        config=FinetuneConfig(**s.finetune, **common),
        progress=progress,
    )
    timings["finetune"] = time.perf_counter() - t

    t = _stage(echo, f"evaluating on the test split -> {paths['report_dir']}")
    result = _cached_report(paths)
    if result is None:
        result = evaluate(
            [paths["pretrained"], paths["finetuned"]],
            db,
            paths["report_dir"],
            split="test",
            select_eta_on="val",
            names=["pretrained", "bptt"],
            eta_grid=s.eta_grid,
            fire_steps=s.fire_steps,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    else:
        echo("    reusing the report (newer than both checkpoints)")
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    table = format_table(
        ["method", "model", "eta", "Dq mean", "Dq median", "frames"],
        demo_rows(result, pretrained="pretrained", finetuned="bptt"),
        markdown=False,
    )
    echo("")
    echo(f"Dq (amu^1/2 A) on the test split, {result['n_structures']} silicon-defect structures:")
    echo(table)
    echo("")
    echo("The 'perfect information' eta is chosen on the test split itself (as the paper's Table 6); the")
    echo("honest fixed-step baseline uses the eta chosen on the val split.")
    echo(f"report: {paths['report_dir'] / 'report.md'}")
    echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return {
        "result": result,
        "table": table,
        "report": paths["report_dir"] / "report.md",
        "timings": timings,
        "paths": paths,
    }


def _resumable(echo: Callable[[str], Any], train: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
    """Run a training stage: it resumes or returns at once when its output is there.

    An output made with other settings or data (e.g. ``--quick`` earlier in the
    same directory, or a bigger database now) is replaced, since the demo owns
    its directory.
    """
    from ase_bptt.train.common import ConfigMismatchError

    try:
        return train(*args, **kwargs)
    except ConfigMismatchError:
        echo(f"    {args[1]} was made with other settings or data: training it again")
        return train(*args, overwrite=True, **kwargs)


def _cached_report(paths: dict[str, Path]) -> dict[str, Any] | None:
    """The existing report.json when it is newer than both checkpoints (a finished re-run)."""
    report = paths["report_dir"] / "report.json"
    if not report.exists():
        return None
    newest = max(paths["pretrained"].stat().st_mtime, paths["finetuned"].stat().st_mtime)
    if report.stat().st_mtime <= newest:
        return None
    try:
        result = json.loads(report.read_text())
    except json.JSONDecodeError:
        return None
    names = [ck.get("name") for ck in result.get("checkpoints", [])]
    return result if names == ["pretrained", "bptt"] else None

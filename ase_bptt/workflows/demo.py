"""The demo pipeline behind ``ase-bptt demo`` / ``make demo``.

Generate the built-in silicon point-defect set, assign splits, fine-tune with
the package's default training recipe exactly as ``ase-bptt finetune db -o
model.pt`` does with no options (it pretrains first, then runs BPTT and
chooses on val; :mod:`ase_bptt.train.presets`), evaluate the pretrained and
the tuned model on the test split and print the Dq table: do nothing / ASE
FIRE / best fixed step (eta chosen on val) / fixed step with eta chosen on test
(the paper's "perfect information" line) / the tuned model as exported / the
tuned model with ASE FIRE.

Every stage leaves its product in the output directory and is skipped when
that product is already there (the database is topped up to the target size,
an interrupted training resumes from its state file), so re-running the demo
in the same directory reuses what exists instead of redoing it.

The full demo uses four defect kinds (vacancy, divacancy, tetrahedral and
split-<110> interstitial) at random sites of 64-site cells, so the targets
differ from structure to structure. The recipe's budgets are optimiser steps,
never seconds, so a seed gives the same numbers at any machine load; the demo
prints the wall and CPU time of each stage (measured runs in ``docs/demo.md``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_DEFECTS", "DemoSettings", "QUICK", "FULL", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo flavour.

    Attributes:
        n_trajectories: silicon-defect relaxations to generate.
        val, test: split fractions (per trajectory).
        recipe: the training recipe (ase_bptt.train.presets), as ``finetune --recipe``.
        generate_options: extra options of the "si-defects" recipe.
        eta_grid: fixed step sizes of the evaluation (None: its default grid).
        fire_steps: ASE FIRE step limit in the evaluation.
    """

    n_trajectories: int
    val: float
    test: float
    recipe: str = "default"
    generate_options: dict[str, Any] = field(default_factory=dict)
    eta_grid: tuple[float, ...] | None = None
    fire_steps: int = 300


#: Mixed kinds at random sites; not the hexagonal interstitial, whose Stillinger-Weber
#: relaxation ends in a rattle-chosen basin (README "What makes the gain large"), nor
#: substitutions, which the Stillinger-Weber reference cannot make.
DEMO_DEFECTS = ("vacancy", "divacancy", "interstitial-tetrahedral", "interstitial-split110")

QUICK = DemoSettings(
    n_trajectories=12,
    val=0.25,
    test=0.3,
    recipe="quick",
    # Looser reference relaxations (still converged by the database's 0.05 eV/A): fewer frames.
    generate_options={"fmax": 0.03, "defects": DEMO_DEFECTS, "site": "random"},
    eta_grid=(0.01, 0.03, 0.1),
    fire_steps=40,
)

#: The default recipe on 120 relaxations (86 train): what a user gets from ``finetune`` with no options.
FULL = DemoSettings(
    n_trajectories=120,
    val=0.15,
    test=0.15,
    generate_options={"defects": DEMO_DEFECTS, "site": "random"},
)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the generator's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Stages:
    """Prints each stage's name, then its wall and CPU seconds when the next begins."""

    def __init__(self, echo: Callable[[str], Any]) -> None:
        self.echo = echo
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._open: tuple[str, float, float] | None = None
        self._start = (time.perf_counter(), _cpu_seconds())

    def begin(self, name: str, text: str) -> None:
        self.end()
        self.echo(f"==> {text}")
        self._open = (name, time.perf_counter(), _cpu_seconds())

    def end(self) -> None:
        if self._open is None:
            return
        name, wall, cpu = self._open
        self.wall[name], self.cpu[name] = time.perf_counter() - wall, _cpu_seconds() - cpu
        self.echo(f"    {name}: wall {self.wall[name]:.0f} s, CPU {self.cpu[name]:.0f} s")
        self._open = None

    def total(self) -> None:
        self.end()
        self.wall["total"] = time.perf_counter() - self._start[0]
        self.cpu["total"] = _cpu_seconds() - self._start[1]


def run_demo(
    out_dir: str | os.PathLike = "demo-out",
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    device: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    workers: int = 1,
    threads: int | None = 1,
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
        threads: torch CPU threads while the demo runs (restored after; None:
            torch's default). One, because the small model's tensors are too
            small to share: its 2000 pretraining steps took 184 CPU-s on one
            thread and 599 CPU-s (613 s wall) on two, on the 2-core machine.
        echo: where lines go (``click.echo`` from the CLI).

    Returns:
        ``{"result": evaluate's dict, "table": str, "report": Path,
        "timings": {stage: wall seconds}, "cpu_times": {stage: CPU seconds},
        "paths": {...}}``.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, quick, settings, device, dtype, seed, workers, progress, echo)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(out_dir, quick, settings, device, dtype, seed, workers, progress, echo) -> dict[str, Any]:
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.generate import generate
    from ase_bptt.evaluation.pipeline import evaluate
    from ase_bptt.train.finetune import finetune
    from ase_bptt.train.presets import finetune_config

    s = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "db": out / "si-defects.db",
        "pretrained": out / "model-pretrained.pt",
        "finetuned": out / "model.pt",
        "report_dir": out / "report",
    }
    stages = _Stages(echo)
    echo(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")

    db = TrajectoryDB(paths["db"], create=True)
    stages.begin("generate", f"silicon point defects: {s.n_trajectories} relaxations into {paths['db']}")
    # generate() is resumable: it adds only the trajectories not yet in the database.
    added = generate(
        "si-defects", db, n=s.n_trajectories, seed=seed, workers=workers, progress=progress, **s.generate_options
    )
    if not added:
        echo(f"    reusing {len(db)} trajectories")
    counts = db.assign_splits(val=s.val, test=s.test, seed=seed)
    echo("    splits: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    stages.begin("finetune", f"ase-bptt finetune (recipe {s.recipe}) -> {paths['finetuned']}")
    config = finetune_config(s.recipe, device=device, dtype=dtype, seed=seed)
    _resumable(echo, finetune, db, paths["finetuned"], config=config, progress=progress, workers=workers)

    stages.begin("evaluate", f"evaluating on the test split -> {paths['report_dir']}")
    result = _cached_report(paths)
    if result is None:
        result = evaluate(
            [paths["pretrained"], paths["finetuned"]],
            db,
            paths["report_dir"],
            split="test",
            select_eta_on="val",
            names=["pretrained", "tuned"],
            eta_grid=s.eta_grid,
            fire_steps=s.fire_steps,
            device=device,
            dtype=dtype,
            progress=progress,
        )
    else:
        echo("    reusing the report (newer than both checkpoints)")
    stages.total()
    table = _print_summary(result, stages, paths["report_dir"], echo)
    return {
        "result": result,
        "table": table,
        "report": paths["report_dir"] / "report.md",
        "timings": stages.wall,
        "cpu_times": stages.cpu,
        "paths": paths,
    }


def _print_summary(result: dict[str, Any], stages: _Stages, report_dir: Path, echo: Callable[[str], Any]) -> str:
    """The demo's closing lines: the Dq table, the comparisons, the model errors, where the report is and the
    time each stage took; returns the table."""
    from ase_bptt.evaluation.report import model_error_lines
    from ase_bptt.evaluation.rows import format_table

    table = format_table(
        ["method", "model", "eta", "Dq mean", "Dq median", "frames", "force MAE", "energy MAE"],
        demo_rows(result, pretrained="pretrained", finetuned="tuned"),
        markdown=False,
    )
    echo("")
    echo(f"Dq (amu^1/2 A) on the test split, {result['n_structures']} silicon-defect structures:")
    echo(table)
    echo("")
    echo("The 'perfect information' eta is chosen on the test split itself (as the paper's Table 6); the")
    echo("honest fixed-step baseline uses the eta chosen on the val split.")
    ratios, per_kind = _ratios(result)
    if ratios:
        echo(ratios)
        for line in model_error_lines(result):
            echo(line)
        echo(per_kind)
    echo(f"report: {report_dir / 'report.md'}")
    echo("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.wall.items()))
    echo("CPU time: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.cpu.items()))
    echo(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return table


def _resumable(echo: Callable[[str], Any], train: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
    """Run a training stage: it resumes or returns at once when its output is there.

    An output made with other settings or data (e.g. ``--quick`` earlier in the
    same directory, or a bigger database now) is replaced, since the demo owns
    its directory.
    """
    from ase_bptt.runs.errors import ConfigMismatchError

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
    return result if names == ["pretrained", "tuned"] else None


def demo_rows(result: Mapping[str, Any], *, pretrained: str, finetuned: str) -> list[list[Any]]:
    """The demo's Dq table: do nothing / ASE FIRE / best fixed step / BPTT.

    Args:
        result: an ``evaluate`` result holding both checkpoints.
        pretrained: ``name`` of the force-matched checkpoint (FIRE and fixed
            steps are run with it, as in the paper's baselines).
        finetuned: ``name`` of the BPTT fine-tuned checkpoint.

    Returns:
        Rows ``[method, model, eta, Dq mean, Dq median, frames, force MAE (eV/A), energy MAE (meV/atom)]``.
    """
    by_name = {ck["name"]: ck for ck in result["checkpoints"]}
    pre, fine = by_name[pretrained], by_name[finetuned]
    base = result["do_nothing"]["dq"]
    rows: list[list[Any]] = [["do nothing", "-", None, base["mean"], base["median"], 0.0, None, None]]

    def add(label: str, ck: Mapping[str, Any], key: str) -> None:
        entry, forces = ck.get(key), ck["forces"]
        if entry:
            dq = entry["dq"]
            rows.append(
                [
                    label,
                    ck["name"],
                    entry.get("eta"),
                    dq["mean"],
                    dq["median"],
                    entry.get("frames_mean"),
                    forces["mae"],
                    forces.get("energy_mae_mev_per_atom"),
                ]
            )

    add("ASE FIRE (fmax %.2g)" % pre["fire"]["fmax"], pre, "fire")
    sel = pre.get("fixed_step_selected")
    if sel:
        add(f"best fixed step (eta chosen on {sel['chosen_on']})", pre, "fixed_step_selected")
    pi = pre["fixed_step_perfect_information"]
    add(f"fixed step, eta chosen on {pi['chosen_on']} (perfect information)", pre, "fixed_step_perfect_information")
    own = fine.get("own_rule")
    add(f"BPTT fine-tuned ({own['rule'] if own else '?'})", fine, "own_rule")
    add("ASE FIRE on the fine-tuned model", fine, "fire")
    return rows


def _ratios(result: dict[str, Any]) -> tuple[str, str]:
    """The headline ratios (mean, median per structure, fraction improved) and a per-kind table (BPTT over the
    val-chosen fixed step); empty without them."""
    from ase_bptt.evaluation.compare import ratio_stats
    from ase_bptt.evaluation.rows import format_table

    by_name = {ck["name"]: ck for ck in result["checkpoints"]}
    fixed = by_name["pretrained"].get("fixed_step_selected")
    fire, own = by_name["pretrained"].get("fire"), by_name["tuned"].get("own_rule")
    if not (fixed and fire and own):
        return "", ""

    def against(base: Mapping[str, Any]) -> str:
        r = ratio_stats(own["per_structure"], base["per_structure"])
        return (
            f"{own['dq']['mean'] / base['dq']['mean']:.3f} (median per-structure ratio {r['median_ratio']:.3f}, "
            f"{100 * r['improved']:.0f}% of structures improved)"
        )

    headline = f"BPTT / best fixed step: {against(fixed)}\nBPTT / ASE FIRE: {against(fire)}"
    rows = []
    for label, entry in own["dq"]["per_label"].items():
        base = fixed["dq"]["per_label"][label]["mean"]
        rows.append(
            [label, entry["n"], fire["dq"]["per_label"][label]["mean"], base, entry["mean"], entry["mean"] / base]
        )
    table = format_table(["defect", "n", "ASE FIRE", "best fixed step", "BPTT", "BPTT / fixed"], rows, markdown=False)
    return headline, "Dq mean per defect kind:\n" + table

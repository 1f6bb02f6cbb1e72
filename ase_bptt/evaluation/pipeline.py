"""Evaluate checkpoints on a split: Dq for ASE FIRE, fixed steps, each checkpoint's exported relaxation and baselines.

For each checkpoint, on the split's converged trajectories (initial frame ->
reference relaxed frame):

(a) ASE FIRE driven by :class:`~ase_bptt.calculator.BPTTCalculator`, one
    structure at a time through ASE, exactly as a user would relax;
(b) fixed-step rollouts ``X <- X + eta * F`` over a grid of eta (the "eta
    curve"), batched and without gradients. The best eta on the evaluated
    split is reported as the paper's Table 6 did, labelled *perfect
    information* because it is chosen on the data it scores; the eta chosen
    on another split (val by default) is the honest baseline;
(c) the relaxation the checkpoint stores (fine-tuning exports the one chosen
    on val: its own rule or ASE FIRE), "as exported";

plus force and energy errors on every frame of the split, frames taken, the
do-nothing baseline (Dq of the initial structure), ASE FIRE with any baseline
calculator (:mod:`ase_bptt.evaluation.baselines`; a universal model's
untouched base when a checkpoint tuned one), for every method the fraction of
structures ending in the reference's basin, every comparison as the ratio of
the means, the median per-structure ratio and the fraction improved
(:mod:`ase_bptt.evaluation.compare`) and, with a :class:`Refinement`, the
reference steps each method's structures still need
(:mod:`ase_bptt.evaluation.refine`). Structures with an element a checkpoint
never saw are listed with the reason and left out of every row, so all rows
score the same structures. :func:`evaluate` is a pipeline of named steps
(:class:`Evaluation`); it returns the result dict and writes it with
:func:`ase_bptt.evaluation.report.write_report`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ase_bptt import __version__, metrics
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.data.datasets import open_db
from ase_bptt.errors import AseBpttError
from ase_bptt.evaluation.baselines import Baseline, fire_relax_all, parse_baseline, run_baseline
from ase_bptt.evaluation.compare import comparisons, per_element, worse_labels
from ase_bptt.evaluation.plots import paired_data
from ase_bptt.evaluation.refine import Refinement, refine
from ase_bptt.evaluation.relaxations import (
    best_point,
    eta_curves,
    progress_bar,
    rollout_all,
    rule_name,
    stored_relaxation,
)
from ase_bptt.evaluation.rows import method_label
from ase_bptt.evaluation.split import evaluable, force_errors, load_split, method_entry, selection_split, unique_stems
from ase_bptt.evaluation.universal import default_eta_grid, forgetting_entry, untouched_bases
from ase_bptt.outputs import check_not_inputs, check_writable_output
from ase_bptt.relax import defaults
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID
from ase_bptt.runs.config import resolve_dtype, to_jsonable
from ase_bptt.runs.distributed import resolve_device
from ase_bptt.runs.errors import EmptySplitError

__all__ = ["DEFAULT_ETA_GRID", "EmptySplitError", "NoStepRuleError", "Evaluation", "evaluate"]

log = logging.getLogger("ase_bptt.evaluation")


class NoStepRuleError(AseBpttError, ValueError):
    """A checkpoint stores no step rule, so it cannot relax with the learned optimizer."""


def evaluate(
    checkpoints: Sequence[str | os.PathLike],
    db: Any,
    out_dir: str | os.PathLike | None,
    *,
    split: str = "test",
    select_eta_on: str | None = "val",
    eta_grid: Sequence[float] | None = None,
    fire_fmax: float = defaults.DEFAULT_FMAX,
    fire_steps: int = defaults.DEFAULT_FIRE_STEPS,
    tol: float = defaults.DEFAULT_TOL,
    max_steps: int = defaults.DEFAULT_MAX_STEPS,
    maxstep: float = 0.2,
    metric: str = "dq",
    batch_size: int = defaults.EVAL_BATCH_SIZE,
    names: Sequence[str] | None = None,
    baselines: Sequence[str | Baseline] = (),
    refinement: Refinement | None = None,
    basin_rms: float = metrics.CORRECT_BASIN_RMS,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate checkpoints (and baseline calculators) on one split and write the report.

    Args:
        checkpoints: checkpoint files (``.pt``) to compare; the first is the pretrained one the
            others are compared with.
        db: a TrajectoryDB or its path/URL.
        out_dir: where ``report.md``, ``report.json`` and the PNGs go; None
            writes nothing (the dict is still returned).
        split: the split scored ("train", "val" or "test").
        select_eta_on: a second split on which the honest fixed-step eta is
            chosen (falls back to "train" when it is empty, saying so as a
            warning and in the report's ``selection_note``; None to skip).
        eta_grid: fixed step sizes in A^2/eV (default :data:`DEFAULT_ETA_GRID`, or
            :data:`~ase_bptt.relax.defaults.UNIVERSAL_ETA_GRID` when a checkpoint holds a universal MLIP).
        fire_fmax: ASE FIRE's force criterion (eV/A), for models and baselines.
        fire_steps: ASE FIRE's step limit, for models and baselines.
        tol: RMS per-atom displacement that stops a fixed-step rollout (A).
        max_steps: frame limit of a fixed-step rollout.
        maxstep: largest per-frame displacement of the fixed-step rule (A).
        metric: "dq" (mass-weighted, the default) or "mse" (pure crystals).
        batch_size: structures per batched rollout.
        names: display names for the checkpoints (default: file stems).
        baselines: ASE calculators relaxed with ASE FIRE as extra rows,
            ``NAME|module:Class[,key=value...]`` (see
            :func:`~ase_bptt.evaluation.baselines.parse_baseline`).
        refinement: refine every method's final structures with a reference calculator
            (:func:`~ase_bptt.evaluation.refine.parse_refinement`; ``--refine-with``).
        basin_rms: RMS per-atom distance (A) within which a final structure
            counts as in the reference's basin.
        device: torch device (None: CUDA if available, else CPU).
        dtype: "float32" or "float64".
        progress: show tqdm progress bars on stderr.
        plots: draw the PNG plots beside report.md (False: report.md and report.json only).

    Returns:
        The result dict written to ``report.json``. Structures holding an
        element some checkpoint was never trained on are left out of every
        row and listed under ``skipped`` with the reason.

    Raises:
        FileNotFoundError: a checkpoint or database path does not exist.
        EmptySplitError: ``split`` has no converged trajectories, or none the
            checkpoints can evaluate.
        CheckpointError: a checkpoint cannot be read.
        BaselineError: a baseline specification is wrong.
        OutputIsInputError, OutputNotWritableError: ``out_dir`` or a report
            file is an input, or cannot be created (checked first).
    """
    settings = {
        "eta_grid": None if eta_grid is None else [float(e) for e in eta_grid],  # None: decided in load()
        "fire_fmax": fire_fmax,
        "fire_steps": fire_steps,
        "tol": tol,
        "max_steps": max_steps,
        "maxstep": maxstep,
        "batch_size": batch_size,
        "basin_rms": basin_rms,
    }
    job = Evaluation(
        checkpoints,
        db,
        out_dir,
        split=split,
        metric=metric,
        names=names,
        settings=settings,
        device=device,
        dtype=dtype,
        progress=progress,
        plots=plots,
    )
    job.check(baselines)
    job.load(select_eta_on)
    result = job.header()
    result["baselines"] = [job.baseline_entry(b) for b in job.baselines]
    result["checkpoints"] = [job.checkpoint_entry(name) for name in job.names]
    result["baselines"] += job.universal_entries(result["checkpoints"])
    job.compare(result)
    if refinement is not None:
        result["refinement"] = job.refine(refinement, result)
    job.write(result)
    return result


class Evaluation:
    """The steps of one :func:`evaluate` call, in order: :meth:`check`, :meth:`load`, :meth:`header`,
    :meth:`baseline_entry`, :meth:`checkpoint_entry`, :meth:`universal_entries`, :meth:`compare`,
    :meth:`refine`, :meth:`write`. ``finals`` keeps every method's final positions for the refinement."""

    def __init__(
        self,
        checkpoints: Sequence[str | os.PathLike],
        db: Any,
        out_dir: str | os.PathLike | None,
        *,
        split: str,
        metric: str,
        names: Sequence[str] | None,
        settings: Mapping[str, Any],
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        progress: bool,
        plots: bool,
    ) -> None:
        if not checkpoints:
            raise ValueError("evaluate needs at least one checkpoint")
        self.paths = [Path(c) for c in checkpoints]
        self.db_arg, self.out_dir, self.split_name, self.metric = db, out_dir, split, metric
        self.settings, self.progress, self.plots = dict(settings), progress, plots
        self.names = list(names) if names is not None else unique_stems(self.paths)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.settings.update(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""))
        self.entry_kw: dict[str, Any] = {"metric": metric, "basin_rms": settings["basin_rms"]}
        self.finals: dict[tuple[str, str], torch.Tensor] = {}
        self.labels: dict[tuple[str, str], str] = {}

    # ---------------------------------------------------------------- steps
    def check(self, baselines: Sequence[str | Baseline]) -> None:
        """Every option and path, before anything is computed or written."""
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"checkpoint {p} does not exist")
        if self.out_dir is not None:
            from ase_bptt.evaluation.report import report_files

            written = [
                (self.out_dir, "the report folder"),
                *((f, "the report") for f in report_files(self.out_dir, plots=self.plots).values()),
            ]
            inputs = [(self.db_arg, "the database --db"), *((p, "a checkpoint to evaluate") for p in self.paths)]
            check_not_inputs(written, inputs, option="-o/--out")
            check_writable_output(self.out_dir, option="-o/--out", directory=True)
        grid, s = self.settings["eta_grid"], self.settings
        if grid is not None and (not grid or any(not (e > 0 and math.isfinite(e)) for e in grid)):
            raise ValueError(f"eta grid must be positive finite step sizes, got {grid}")
        if self.metric not in ("dq", "mse"):
            raise ValueError(f"unknown metric {self.metric!r}: use dq or mse")
        if not (s["basin_rms"] > 0 and math.isfinite(s["basin_rms"])):
            raise ValueError(f"basin_rms must be a positive distance in A, got {s['basin_rms']}")
        if len(self.names) != len(self.paths):
            raise ValueError("give one name per checkpoint")
        self.baselines = [parse_baseline(b) for b in baselines]

    def load(self, select_eta_on: str | None) -> None:
        """The checkpoints, their models, the evaluated split and the split the honest eta is chosen on."""
        from ase_bptt.models.checkpoint import load_checkpoint, load_model

        self.ckpts = {name: load_checkpoint(path) for name, path in zip(self.names, self.paths)}
        files = dict(zip(self.names, map(str, self.paths)))  # so a weight/config mismatch names the file
        self.models = {
            name: load_model(ck, device=self.device, dtype=self.dtype, name=files[name]).eval()
            for name, ck in self.ckpts.items()
        }
        if self.settings["eta_grid"] is None:
            self.settings["eta_grid"] = list(default_eta_grid(self.models))
        self.database = open_db(self.db_arg)
        self.data, self.skipped = evaluable(load_split(self.database, self.split_name), self.models)
        if len(self.skipped) == len(self.data):
            raise EmptySplitError(
                f"no structure of split {self.split_name!r} of {getattr(self.database, 'name', self.db_arg)} can be "
                f"evaluated: {self.skipped[0]['reason']}"
            )
        self.selection, self.selection_note = selection_split(
            self.database, self.split_name, select_eta_on, self.models
        )
        if self.selection_note:
            log.warning("%s", self.selection_note)
        self.finals[("-", "do_nothing")] = self.data.batch64.positions
        self.labels[("-", "do_nothing")] = "do nothing (initial structure)"

    def header(self) -> dict[str, Any]:
        """What was evaluated, how, and the do-nothing row."""
        data = self.data
        return {
            "format": "ase-bptt-report",
            "format_version": 3,
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "database": str(getattr(self.database, "name", self.db_arg)),
            "split": self.split_name,
            "selection_split": self.selection.name if self.selection else None,
            "selection_note": self.selection_note,
            "metric": self.metric,
            "settings": self.settings,
            "n_structures": len(data),
            "label_counts": {lab: data.labels.count(lab) for lab in sorted(set(data.labels))},
            "structures": [
                {"traj_id": t, "label": lab, "n_atoms": len(a), "elements": sorted(set(a.get_chemical_symbols()))}
                for t, lab, a in zip(data.traj_ids, data.labels, data.initial)
            ],
            "skipped": self.skipped,
            "do_nothing": method_entry(data, data.batch64.positions, **self.entry_kw),
        }

    def baseline_entry(self, baseline: Baseline, *, forces: dict[str, Any] | None = None) -> dict[str, Any]:
        """ASE FIRE with a baseline calculator on every structure (a failure is listed, not fatal)."""
        s = self.settings
        finals: dict[str, torch.Tensor] = {}

        def entry(sp, final, **kw):
            finals["final"] = final
            return method_entry(sp, final, **self.entry_kw, **kw)

        out = run_baseline(
            baseline,
            self.data,
            fmax=s["fire_fmax"],
            steps=s["fire_steps"],
            entry=entry,
            progress=lambda it: progress_bar(it, enabled=self.progress, desc=f"ASE FIRE with {baseline.name}"),
        )
        if forces is not None:
            out["forces"] = forces
        if "final" in finals and out["n_evaluated"] == len(self.data):  # refinable: every structure relaxed
            self.finals[(baseline.name, "baseline")] = finals["final"]
            self.labels[(baseline.name, "baseline")] = f"ASE FIRE with {baseline.name}"
        return out

    def checkpoint_entry(self, name: str) -> dict[str, Any]:
        """One checkpoint: its force and energy errors, ASE FIRE, the eta curve and its exported relaxation."""
        ckpt, model = self.ckpts[name], self.models[name]
        entry: dict[str, Any] = {
            "name": name,
            "path": str(self.paths[self.names.index(name)]),
            "model": {"name": ckpt["model"].get("name"), "n_parameters": sum(p.numel() for p in model.parameters())},
            "relax": to_jsonable(ckpt.get("relax"), max_tensor=16),
            "forces": self._forces(name, model),
        }
        entry["fire"] = self._fire(name, model)
        entry.update(self._fixed_steps(name, model))
        entry["own_rule"] = self._exported(name, model, ckpt)
        entry["history"] = to_jsonable((ckpt.get("metadata") or {}).get("history"), max_tensor=16)
        for key in ("fire", "fixed_step_selected", "own_rule"):
            if entry.get(key) and (name, key) in self.finals:
                self.labels[(name, key)] = f"{name}: {method_label(key, entry[key])}"
        return entry

    def universal_entries(self, checkpoints: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """For every checkpoint that tuned a universal MLIP: its untouched base model with ASE FIRE as a baseline
        row (what the user would relax with without tuning), and ``forgetting`` in the checkpoint's entry."""
        names, bases = untouched_bases(
            {e["name"]: self.models[e["name"]] for e in checkpoints}, self.device, self.dtype
        )
        out = [self.baseline_entry(calc, forces=self._forces(label, base)) for label, (calc, base) in bases.items()]
        for entry in checkpoints:
            if entry["name"] in names:
                label = names[entry["name"]]
                entry["forgetting"] = forgetting_entry(self.models[entry["name"]], bases[label][1], label)
        return out

    def compare(self, result: dict[str, Any]) -> None:
        """Every comparison the report shows, from the rows already computed."""
        result["comparisons"] = comparisons(result)
        result["paired"] = paired_data(result)
        result["per_element"] = per_element(result)
        result["worse_labels"] = worse_labels(result)

    def refine(self, refinement: Refinement, result: Mapping[str, Any]) -> dict[str, Any]:
        """The reference steps each method's final structures still need (:func:`~ase_bptt.evaluation.refine.refine`)."""
        pre = str(result["checkpoints"][0]["name"]) if result["checkpoints"] else "-"
        fire = (pre, "fire") if (pre, "fire") in self.finals else None
        return refine(
            refinement,
            self.data,
            self.finals,
            labels=self.labels,
            initial=("-", "do_nothing"),
            pretrained_fire=fire,
            progress=lambda it, desc: progress_bar(it, enabled=self.progress, desc=desc),
        )

    def write(self, result: dict[str, Any]) -> None:
        """report.json, report.md and the plots (nothing without an output folder)."""
        if self.out_dir is None:
            return
        from ase_bptt.evaluation.report import report_files, write_report

        # report.json lists its sibling files, so they are named before anything is written.
        result["files"] = {k: str(v) for k, v in report_files(self.out_dir, plots=self.plots).items()}
        write_report(result, self.out_dir, plots=self.plots)

    # ------------------------------------------------------------- pieces
    def _forces(self, name: str, model) -> dict[str, Any]:
        return force_errors(
            model,
            self.database,
            self.split_name,
            batch_size=max(self.settings["batch_size"], 16),
            device=self.device,
            dtype=self.dtype,
            progress=lambda it: progress_bar(it, enabled=self.progress, desc=f"{name}: force errors"),
        )

    def _fire(self, name: str, model) -> dict[str, Any]:
        s = self.settings
        final, steps, conv, _ = fire_relax_all(
            BPTTCalculator(model, device=self.device, dtype=self.dtype),
            self.data.initial,
            fmax=s["fire_fmax"],
            steps=s["fire_steps"],
            progress=lambda it: progress_bar(it, enabled=self.progress, desc=f"{name}: ASE FIRE"),
        )
        self.finals[(name, "fire")] = final
        entry = method_entry(
            self.data,
            final,
            frames=steps,
            converged=conv,
            fmax=s["fire_fmax"],
            max_steps=s["fire_steps"],
            **self.entry_kw,
        )
        entry["steps_mean"] = entry["frames_mean"]
        return entry

    def _fixed_steps(self, name: str, model) -> dict[str, Any]:
        """The eta curve, its best point (perfect information) and the point at the eta chosen on the selection split."""
        s = self.settings
        splits = [self.data] if self.selection is None else [self.data, self.selection]
        curves, finals = eta_curves(
            model,
            splits,
            s["eta_grid"],
            tol=s["tol"],
            max_steps=s["max_steps"],
            maxstep=s["maxstep"],
            batch_size=s["batch_size"],
            device=self.device,
            dtype=self.dtype,
            entry_kw=self.entry_kw,
            progress=self.progress,
            desc=f"{name}: eta curve",
        )
        curve = curves[0]
        out: dict[str, Any] = {
            "eta_curve": [_point(p) for p in curve],
            "fixed_step_perfect_information": {**best_point(curve), "chosen_on": self.split_name},
            "fixed_step_selected": None,
            "selection_eta_curve": None,
        }
        if self.selection is not None:
            chosen = best_point(curves[1])
            at = next(p for p in curve if p["eta"] == chosen["eta"])
            out["fixed_step_selected"] = {
                **at,
                "chosen_on": self.selection.name,
                "selection_dq_mean": chosen["dq"]["mean"],
            }
            out["selection_eta_curve"] = [_point(p) for p in curves[1]]
            self.finals[(name, "fixed_step_selected")] = finals[chosen["eta"]]
        return out

    def _exported(self, name: str, model, ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
        """The relaxation the checkpoint stores, batched in torch (None when it stores none)."""
        own = stored_relaxation(ckpt)
        if own is None:
            return None
        s = self.settings
        rule, own_tol, own_max, own_fmax = own
        rule = rule.to(device=self.device, dtype=self.dtype).eval()
        own_tol = (None if rule.stops_by_force else s["tol"]) if own_tol is None else float(own_tol)
        own_max = s["max_steps"] if own_max is None else int(own_max)
        pos, frames, conv = rollout_all(
            model,
            self.data.initial,
            rule,
            tol=own_tol,
            max_steps=own_max,
            fmax=own_fmax,
            batch_size=s["batch_size"],
            device=self.device,
            dtype=self.dtype,
        )
        final = pos[:, : self.data.batch64.positions.shape[1]]
        self.finals[(name, "own_rule")] = final
        eta: Any = getattr(rule, "eta", None)
        scalar = isinstance(eta, (float, int, torch.Tensor)) and torch.as_tensor(eta).numel() == 1
        return method_entry(
            self.data,
            final,
            frames=frames,
            converged=conv,
            rule=rule_name(rule, own_fmax),
            eta=float(eta) if scalar else None,
            tol=own_tol,
            max_steps=own_max,
            fmax=own_fmax,
            **self.entry_kw,
        )


def _point(p: Mapping[str, Any]) -> dict[str, Any]:
    """An eta-curve point without its per-structure lists (the curve would repeat them per eta)."""
    return {k: v for k, v in p.items() if k not in ("per_structure", "rms_distance")}

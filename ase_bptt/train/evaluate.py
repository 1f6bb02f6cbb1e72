"""Evaluate checkpoints on a split: Dq for ASE FIRE, fixed steps, the model's own rule and baselines.

For each checkpoint, on the split's converged trajectories (initial frame ->
reference relaxed frame):

(a) ASE FIRE driven by :class:`~ase_bptt.calculator.BPTTCalculator`, one
    structure at a time through ASE, exactly as a user would relax;
(b) fixed-step rollouts ``X <- X + eta * F`` over a grid of eta (the "eta
    curve"), batched and without gradients. The best eta on the evaluated
    split is reported as the paper's Table 6 did, labelled *perfect
    information* because it is chosen on the data it scores; the eta chosen
    on another split (val by default) is the honest baseline;
(c) the checkpoint's own step rule with its ``tol`` / ``max_steps``;

plus force errors on every frame of the split, frames taken, the
do-nothing baseline (Dq of the initial structure), ASE FIRE with any
baseline calculator (:mod:`ase_bptt.train.baselines`) and, for every method,
the fraction of structures ending in the reference's basin. Structures with
an element a checkpoint never saw are listed with the reason and left out of
every row, so all rows score the same structures. :func:`evaluate` returns
the result dict and writes it with :func:`ase_bptt.train.report.write_report`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ase_bptt import __version__, metrics
from ase_bptt.batch import Batch
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.errors import AseBpttError
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID
from ase_bptt.train.baselines import Baseline, fire_relax_all, parse_baseline, run_baseline
from ase_bptt.train.common import EmptySplitError, open_db, resolve_dtype
from ase_bptt.train.config import to_jsonable
from ase_bptt.train.distributed import resolve_device
from ase_bptt.train.eval_data import EvalSplit, evaluable, force_errors, load_split, method_entry
from ase_bptt.train.outputs import check_not_inputs, check_writable_output
from ase_bptt.train.plots import paired_data
from ase_bptt.train.worse_labels import worse_labels

__all__ = [
    "DEFAULT_ETA_GRID",
    "EmptySplitError",
    "NoStepRuleError",
    "evaluate",
]


log = logging.getLogger("ase_bptt.train")


class NoStepRuleError(AseBpttError, ValueError):
    """A checkpoint stores no step rule, so it cannot relax with the learned optimizer."""


# ------------------------------------------------------------------ helpers
def _progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def _rollout_all(
    model,
    initial: Sequence,
    rule,
    *,
    tol: float,
    max_steps: int,
    fmax: float | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched no-grad rollouts of the structures ``initial`` (Atoms).

    Returns final positions ``(S, N_max, 3)`` (float64, CPU, zero padded),
    frames taken ``(S,)`` and converged ``(S,)``.
    """
    from ase_bptt.relax.relaxer import rollout

    n_max = max(len(a) for a in initial)
    positions = torch.zeros(len(initial), n_max, 3, dtype=torch.float64)
    n_frames = torch.zeros(len(initial), dtype=torch.long)
    converged = torch.zeros(len(initial), dtype=torch.bool)
    for start in range(0, len(initial), batch_size):
        chunk = initial[start : start + batch_size]
        idx = torch.arange(start, start + len(chunk))
        batch = Batch.from_atoms(chunk, device=device, dtype=dtype)
        with torch.no_grad():
            res = rollout(model, batch, rule, tol=tol, max_steps=max_steps, fmax=fmax)
        n = res.positions.shape[1]
        positions[idx, :n] = res.positions.detach().to("cpu", torch.float64)
        n_frames[idx] = res.n_frames.to("cpu")
        converged[idx] = res.converged.to("cpu")
    return positions, n_frames, converged


def _eta_curves(
    model,
    splits: Sequence[EvalSplit],
    grid: Sequence[float],
    *,
    tol,
    max_steps,
    maxstep,
    batch_size,
    device,
    dtype,
    metric,
    basin_rms,
    progress: bool,
    desc: str,
) -> list[list[dict[str, Any]]]:
    """Fixed-step rollouts over the eta grid, one curve per split.

    The splits' structures are rolled out together (fuller batches, fewer
    model calls); each structure's rollout is independent of its batch mates.
    """
    from ase_bptt.relax.steps import FixedStep

    initial = [a for sp in splits for a in sp.initial]
    curves: list[list[dict[str, Any]]] = [[] for _ in splits]
    for eta in _progress(grid, enabled=progress, desc=desc):
        rule = FixedStep(float(eta), maxstep=maxstep).to(device=device, dtype=dtype)
        pos, frames, conv = _rollout_all(
            model,
            initial,
            rule,
            tol=tol,
            max_steps=max_steps,
            fmax=None,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )
        start = 0
        for sp, curve in zip(splits, curves):
            sl = slice(start, start + len(sp))
            n = sp.batch64.positions.shape[1]
            curve.append(
                method_entry(
                    sp,
                    pos[sl, :n],
                    metric=metric,
                    basin_rms=basin_rms,
                    frames=frames[sl],
                    converged=conv[sl],
                    eta=float(eta),
                )
            )
            start += len(sp)
    return curves


def _best(curve: list[dict[str, Any]]) -> dict[str, Any]:
    # A diverged rollout gives inf/nan; treat it as worse than anything finite.
    return min(curve, key=lambda p: p["dq"]["mean"] if math.isfinite(p["dq"]["mean"]) else math.inf)


def _own_rule(checkpoint: Mapping[str, Any]):
    """The checkpoint's step rule, tol, max_steps and fmax, or None when it has none."""
    relax = checkpoint.get("relax")
    if not relax:
        return None
    from ase_bptt.relax.steps import rule_from_relax_settings

    rule, tol, max_steps = rule_from_relax_settings(dict(relax))
    return rule, tol, max_steps, relax.get("fmax")


def _rule_name(rule) -> str:
    name = type(rule).__name__
    eta = getattr(rule, "eta", None)
    if eta is not None and not callable(eta):
        try:
            return f"{name}, eta {float(eta):.4g}"
        except (TypeError, ValueError):
            pass
    return name


# --------------------------------------------------------------------- main
def evaluate(
    checkpoints: Sequence[str | os.PathLike],
    db: Any,
    out_dir: str | os.PathLike | None,
    *,
    split: str = "test",
    select_eta_on: str | None = "val",
    eta_grid: Sequence[float] | None = None,
    fire_fmax: float = 0.05,
    fire_steps: int = 300,
    tol: float = 1e-3,
    max_steps: int = 75,
    maxstep: float = 0.2,
    metric: str = "dq",
    batch_size: int = 16,
    names: Sequence[str] | None = None,
    baselines: Sequence[str | Baseline] = (),
    basin_rms: float = metrics.CORRECT_BASIN_RMS,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate checkpoints (and baseline calculators) on one split and write the report.

    Args:
        checkpoints: checkpoint files (``.pt``) to compare.
        db: a TrajectoryDB or its path/URL.
        out_dir: where ``report.md``, ``report.json`` and the PNGs go; None
            writes nothing (the dict is still returned).
        split: the split scored ("train", "val" or "test").
        select_eta_on: a second split on which the honest fixed-step eta is
            chosen (falls back to "train" when it is empty, saying so as a
            warning and in the report's ``selection_note``; None to skip).
        eta_grid: fixed step sizes in A^2/eV (default :data:`DEFAULT_ETA_GRID`).
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
            :func:`~ase_bptt.train.baselines.parse_baseline`).
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
    from ase_bptt.models.checkpoint import load_checkpoint, load_model

    if not checkpoints:
        raise ValueError("evaluate needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
    if out_dir is not None:
        from ase_bptt.train.report import report_files

        written = [
            (out_dir, "the report folder"),
            *((f, "the report") for f in report_files(out_dir, plots=plots).values()),
        ]
        check_not_inputs(
            written, [(db, "the database --db"), *((p, "a checkpoint to evaluate") for p in paths)], option="-o/--out"
        )
        check_writable_output(out_dir, option="-o/--out", directory=True)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    grid = [float(e) for e in (eta_grid if eta_grid is not None else DEFAULT_ETA_GRID)]
    if not grid or any(not (e > 0 and math.isfinite(e)) for e in grid):
        raise ValueError(f"eta grid must be positive finite step sizes, got {grid}")
    if metric not in ("dq", "mse"):
        raise ValueError(f"unknown metric {metric!r}: use dq or mse")
    if not (basin_rms > 0 and math.isfinite(basin_rms)):
        raise ValueError(f"basin_rms must be a positive distance in A, got {basin_rms}")
    if names is not None and len(names) != len(paths):
        raise ValueError("give one name per checkpoint")
    names = list(names) if names is not None else _unique_stems(paths)
    baseline_specs = [parse_baseline(b) for b in baselines]

    ckpts = {name: load_checkpoint(path) for name, path in zip(names, paths)}
    files = dict(zip(names, map(str, paths)))  # so a weight/config mismatch names the file
    models: dict[str, Any] = {
        name: load_model(ck, device=dev, dtype=dt, name=files[name]).eval() for name, ck in ckpts.items()
    }
    database = open_db(db)
    data, skipped = evaluable(load_split(database, split), models)
    if len(skipped) == len(data):
        raise EmptySplitError(
            f"no structure of split {split!r} of {getattr(database, 'name', db)} can be evaluated: "
            f"{skipped[0]['reason']}"
        )
    selection, selection_note = _selection_split(database, split, select_eta_on, models)
    if selection_note:
        log.warning("%s", selection_note)

    entry_kw: dict[str, Any] = {"metric": metric, "basin_rms": basin_rms}
    result: dict[str, Any] = {
        "format": "ase-bptt-report",
        "format_version": 2,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "database": str(getattr(database, "name", db)),
        "split": split,
        "selection_split": selection.name if selection else None,
        "selection_note": selection_note,
        "metric": metric,
        "settings": {
            "eta_grid": grid,
            "fire_fmax": fire_fmax,
            "fire_steps": fire_steps,
            "tol": tol,
            "max_steps": max_steps,
            "maxstep": maxstep,
            "batch_size": batch_size,
            "basin_rms": basin_rms,
            "device": str(dev),
            "dtype": str(dt).replace("torch.", ""),
        },
        "n_structures": len(data),
        "label_counts": {lab: data.labels.count(lab) for lab in sorted(set(data.labels))},
        "structures": [
            {"traj_id": t, "label": lab, "n_atoms": len(a), "elements": sorted(set(a.get_chemical_symbols()))}
            for t, lab, a in zip(data.traj_ids, data.labels, data.initial)
        ],
        "skipped": skipped,
        "do_nothing": method_entry(data, data.batch64.positions, **entry_kw),
        "checkpoints": [],
        "baselines": [],
    }

    for baseline in baseline_specs:
        entry = run_baseline(
            baseline,
            data,
            fmax=fire_fmax,
            steps=fire_steps,
            entry=lambda sp, final, **kw: method_entry(sp, final, **entry_kw, **kw),
            progress=lambda it, b=baseline: _progress(it, enabled=progress, desc=f"ASE FIRE with {b.name}"),
        )
        result["baselines"].append(entry)

    for path, name in zip(paths, names):
        ckpt, model = ckpts[name], models[name]
        kw: dict[str, Any] = dict(batch_size=batch_size, device=dev, dtype=dt)
        entry = {
            "name": name,
            "path": str(path),
            "model": {"name": ckpt["model"].get("name"), "n_parameters": sum(p.numel() for p in model.parameters())},
            "relax": to_jsonable(ckpt.get("relax"), max_tensor=16),
            "forces": force_errors(
                model,
                database,
                split,
                batch_size=max(batch_size, 16),
                device=dev,
                dtype=dt,
                progress=lambda it, n=name: _progress(it, enabled=progress, desc=f"{n}: force errors"),
            ),
        }

        final, steps, conv, _ = fire_relax_all(
            BPTTCalculator(model, device=dev, dtype=dt),
            data.initial,
            fmax=fire_fmax,
            steps=fire_steps,
            progress=lambda it, n=name: _progress(it, enabled=progress, desc=f"{n}: ASE FIRE"),
        )
        entry["fire"] = method_entry(
            data, final, frames=steps, converged=conv, fmax=fire_fmax, max_steps=fire_steps, **entry_kw
        )
        entry["fire"]["steps_mean"] = entry["fire"]["frames_mean"]

        splits = [data] if selection is None else [data, selection]
        curves = _eta_curves(
            model,
            splits,
            grid,
            tol=tol,
            max_steps=max_steps,
            maxstep=maxstep,
            progress=progress,
            desc=f"{name}: eta curve",
            **entry_kw,
            **kw,
        )
        curve = curves[0]
        entry["eta_curve"] = [_point(p) for p in curve]
        best = _best(curve)
        entry["fixed_step_perfect_information"] = {**best, "chosen_on": split}
        entry["fixed_step_selected"] = None
        entry["selection_eta_curve"] = None
        if selection is not None:
            sel_curve = curves[1]
            chosen = _best(sel_curve)
            at = next(p for p in curve if p["eta"] == chosen["eta"])
            entry["fixed_step_selected"] = {
                **at,
                "chosen_on": selection.name,
                "selection_dq_mean": chosen["dq"]["mean"],
            }
            entry["selection_eta_curve"] = [_point(p) for p in sel_curve]

        own = _own_rule(ckpt)
        entry["own_rule"] = None
        if own is not None:
            rule, own_tol, own_max, own_fmax = own
            rule = rule.to(device=dev, dtype=dt).eval()
            own_tol = tol if own_tol is None else float(own_tol)
            own_max = max_steps if own_max is None else int(own_max)
            pos, frames, conv = _rollout_all(
                model, data.initial, rule, tol=own_tol, max_steps=own_max, fmax=own_fmax, **kw
            )
            eta = getattr(rule, "eta", None)
            entry["own_rule"] = method_entry(
                data,
                pos[:, : data.batch64.positions.shape[1]],
                frames=frames,
                converged=conv,
                rule=_rule_name(rule),
                eta=float(eta)
                if isinstance(eta, (float, int, torch.Tensor)) and torch.as_tensor(eta).numel() == 1
                else None,
                tol=own_tol,
                max_steps=own_max,
                **entry_kw,
            )
        entry["history"] = to_jsonable((ckpt.get("metadata") or {}).get("history"), max_tensor=16)
        result["checkpoints"].append(entry)

    result["paired"] = paired_data(result)
    from ase_bptt.train.report import per_element

    result["per_element"] = per_element(result)
    result["worse_labels"] = worse_labels(result)
    if out_dir is not None:
        from ase_bptt.train.report import report_files, write_report

        # report.json lists its sibling files, so they are named before anything is written.
        result["files"] = {k: str(v) for k, v in report_files(out_dir, plots=plots).items()}
        write_report(result, out_dir, plots=plots)
    return result


def _selection_split(database, split: str, select_eta_on: str | None, models) -> tuple[EvalSplit | None, str | None]:
    """The split the honest fixed-step eta is chosen on, and what to tell the user when it is not ``select_eta_on``.

    ``select_eta_on`` first, then train; a split that is the evaluated one,
    empty, or holds no structure the checkpoints can evaluate is passed over,
    and saying so (in the console and the report) is the caller's job.
    """
    if select_eta_on is None:
        return None, None
    passed: list[str] = []
    for candidate in dict.fromkeys([select_eta_on, "train"]):
        if candidate == split:
            passed.append(f"{candidate} is the evaluated split")
            continue
        try:
            selection, skipped = evaluable(load_split(database, candidate), models)
        except EmptySplitError:
            passed.append(f"the {candidate} split has no converged trajectories")
            continue
        if len(skipped) < len(selection):
            note = None if candidate == select_eta_on else f"{passed[0]}: the fixed-step eta is chosen on {candidate}"
            return selection, note
        passed.append(f"no structure of the {candidate} split can be evaluated")
    return (
        None,
        f"{'; '.join(passed)}: no fixed-step baseline with an eta chosen on another split (only the one chosen on {split} itself, perfect information)",
    )


def _point(p: Mapping[str, Any]) -> dict[str, Any]:
    """An eta-curve point without its per-structure lists (the curve would repeat them per eta)."""
    return {k: v for k, v in p.items() if k not in ("per_structure", "rms_distance")}


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p) for p in paths]

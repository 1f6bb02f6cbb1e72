"""Evaluate checkpoints on a split: Dq for ASE FIRE, fixed steps and the model's own rule.

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

plus force errors on every frame of the split, frames taken, and the
do-nothing baseline (Dq of the initial structure). :func:`evaluate` returns
the result dict and writes it with :func:`ase_bptt.train.report.write_report`.

:func:`relax_file` (used by ``ase-bptt relax``) lives here too, because it is
the same "relax structures one by one through ASE" path as (a).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from ase_bptt import __version__, metrics
from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID
from ase_bptt.train.common import EmptySplitError, open_db, resolve_dtype
from ase_bptt.train.distributed import resolve_device

__all__ = [
    "DEFAULT_ETA_GRID",
    "EmptySplitError",
    "NoStepRuleError",
    "evaluate",
]


class NoStepRuleError(AseBpttError, ValueError):
    """A checkpoint stores no step rule, so it cannot relax with the learned optimizer."""


# ------------------------------------------------------------------ helpers
def _progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def _summary(values: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """mean / median / per-label {mean, median, n} of per-structure values."""
    per_label: dict[str, list[float]] = {}
    for v, lab in zip(values, labels):
        per_label.setdefault(lab, []).append(v)
    return {
        "mean": float(np.mean(values)),
        "median": float(median(values)),
        "per_label": {
            lab: {"mean": float(np.mean(v)), "median": float(median(v)), "n": len(v)}
            for lab, v in sorted(per_label.items())
        },
    }


@dataclass
class _Split:
    """The evaluated structures: ASE frames plus a float64 Batch for metrics."""

    name: str
    traj_ids: list[str]
    labels: list[str]
    initial: list  # list[Atoms]
    batch64: Batch  # initial structures, float64, CPU
    relaxed64: torch.Tensor  # (B, N, 3) reference relaxed positions

    def __len__(self) -> int:
        return len(self.initial)


def _load_split(db, split: str) -> _Split:
    trajs = db.trajectories(split=split, converged_only=True)
    if not trajs:
        raise EmptySplitError(
            f"split {split!r} of {getattr(db, 'name', db)} has no converged trajectories: "
            "assign splits (ase-bptt import/generate do) or evaluate another --split"
        )
    initial = [t.frames[0].copy() for t in trajs]
    relaxed = [t.frames[-1] for t in trajs]
    batch64 = Batch.from_atoms(initial, dtype=torch.float64)
    ref = Batch.from_atoms(relaxed, dtype=torch.float64, constraints=False).positions
    return _Split(
        name=split,
        traj_ids=[str(t.traj_id) for t in trajs],
        labels=[str(t.label) if t.label is not None else "unlabelled" for t in trajs],
        initial=initial,
        batch64=batch64,
        relaxed64=ref,
    )


def _metric(name: str):
    if name == "dq":
        return metrics.dq
    if name == "mse":
        return metrics.mse
    raise ValueError(f"unknown metric {name!r}: use dq or mse")


def _errors(split: _Split, final: torch.Tensor, metric: str) -> list[float]:
    """Per-structure error of final positions ``(B, N, 3)`` (any dtype/device) against the references."""
    return _metric(metric)(final.detach().to("cpu", torch.float64), split.relaxed64, split.batch64).tolist()


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


def _method_entry(
    split: _Split, values: list[float], *, frames: torch.Tensor, converged: torch.Tensor, **extra: Any
) -> dict[str, Any]:
    return {
        **extra,
        "dq": _summary(values, split.labels),
        "per_structure": values,
        "frames_mean": float(frames.double().mean()),
        "converged_fraction": float(converged.double().mean()),
    }


def _eta_curves(
    model,
    splits: Sequence[_Split],
    grid: Sequence[float],
    *,
    tol,
    max_steps,
    maxstep,
    batch_size,
    device,
    dtype,
    metric,
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
                _method_entry(
                    sp, _errors(sp, pos[sl, :n], metric), frames=frames[sl], converged=conv[sl], eta=float(eta)
                )
            )
            start += len(sp)
    return curves


def _best(curve: list[dict[str, Any]]) -> dict[str, Any]:
    # A diverged rollout gives inf/nan; treat it as worse than anything finite.
    return min(curve, key=lambda p: p["dq"]["mean"] if math.isfinite(p["dq"]["mean"]) else math.inf)


def _fire_all(model, split: _Split, *, fmax: float, steps: int, device, dtype, metric, progress: bool, desc: str):
    from ase.optimize import FIRE

    from ase_bptt.calculator import BPTTCalculator

    calc = BPTTCalculator(model, device=device, dtype=dtype)
    final = torch.zeros_like(split.batch64.positions)
    n_steps = torch.zeros(len(split), dtype=torch.long)
    converged = torch.zeros(len(split), dtype=torch.bool)
    for i, atoms0 in enumerate(_progress(split.initial, enabled=progress, desc=desc)):
        atoms = atoms0.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        converged[i] = bool(opt.run(fmax=fmax, steps=steps))
        n_steps[i] = int(opt.nsteps)
        final[i, : len(atoms)] = torch.from_numpy(atoms.get_positions())
    return final, n_steps, converged


def _force_errors(
    model, db, split: str, *, batch_size: int, device, dtype, progress: bool = False, desc: str = "force errors"
) -> dict[str, Any]:
    """Force (and energy) errors of ``model`` on every frame of the split's trajectories.

    All trajectories count here, converged or not: every frame carries
    reference forces even when its relaxation did not finish.
    """
    frames = [a for t in db.trajectories(split=split, converged_only=False) for a in t.frames]
    sums = {"abs": 0.0, "sq": 0.0, "components": 0, "l2": 0.0, "e_abs_per_atom": 0.0, "e_frames": 0}
    with torch.no_grad():
        for start in _progress(range(0, len(frames), batch_size), enabled=progress, desc=desc):
            chunk = frames[start : start + batch_size]
            batch = Batch.from_atoms(chunk, device=device, dtype=dtype, constraints=False)
            out = model(batch)
            b64 = batch.to(device="cpu", dtype=torch.float64)
            ref = torch.zeros_like(b64.positions)
            for i, a in enumerate(chunk):
                ref[i, : len(a)] = torch.from_numpy(np.asarray(a.calc.results["forces"], dtype=np.float64))
            err = metrics.force_errors(out.forces.detach().to("cpu", torch.float64), ref, b64)
            n_comp = (3 * b64.n_atoms).to(torch.float64)
            sums["abs"] += float((err["mae"] * n_comp).sum())
            sums["sq"] += float((err["rmse"] ** 2 * n_comp).sum())
            sums["components"] += int(n_comp.sum())
            sums["l2"] += float(err["l2"].sum())
            if out.energy is not None:
                for i, a in enumerate(chunk):
                    e_ref = a.calc.results.get("energy")
                    if e_ref is not None:
                        sums["e_abs_per_atom"] += abs(float(out.energy[i]) - float(e_ref)) / len(a)
                        sums["e_frames"] += 1
    n = max(sums["components"], 1)
    return {
        "n_frames": len(frames),
        "mae": sums["abs"] / n,
        "rmse": math.sqrt(sums["sq"] / n),
        "l2": sums["l2"] / max(len(frames), 1),
        "energy_mae_mev_per_atom": 1000 * sums["e_abs_per_atom"] / sums["e_frames"] if sums["e_frames"] else None,
    }


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist() if obj.numel() <= 16 else f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj


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
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate checkpoints on one split and write the report.

    Args:
        checkpoints: checkpoint files (``.pt``) to compare.
        db: a TrajectoryDB or its path/URL.
        out_dir: where ``report.md``, ``report.json`` and the PNGs go; None
            writes nothing (the dict is still returned).
        split: the split scored ("train", "val" or "test").
        select_eta_on: a second split on which the honest fixed-step eta is
            chosen (falls back to "train" when it is empty; None to skip).
        eta_grid: fixed step sizes in A^2/eV (default :data:`DEFAULT_ETA_GRID`).
        fire_fmax: ASE FIRE's force criterion (eV/A).
        fire_steps: ASE FIRE's step limit.
        tol: RMS per-atom displacement that stops a fixed-step rollout (A).
        max_steps: frame limit of a fixed-step rollout.
        maxstep: largest per-frame displacement of the fixed-step rule (A).
        metric: "dq" (mass-weighted, the default) or "mse" (pure crystals).
        batch_size: structures per batched rollout.
        names: display names for the checkpoints (default: file stems).
        device: torch device (None: CUDA if available, else CPU).
        dtype: "float32" or "float64".
        progress: show tqdm progress bars on stderr.

    Returns:
        The result dict written to ``report.json`` (described in the README's
        "What `evaluate` reports").

    Raises:
        FileNotFoundError: a checkpoint or database path does not exist.
        EmptySplitError: ``split`` has no converged trajectories.
        CheckpointError: a checkpoint cannot be read.
        UnknownElementError: the split holds an element a model does not know.
    """
    from ase_bptt.models.checkpoint import load_checkpoint, load_model

    if not checkpoints:
        raise ValueError("evaluate needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    grid = [float(e) for e in (eta_grid if eta_grid is not None else DEFAULT_ETA_GRID)]
    if not grid or any(not (e > 0 and math.isfinite(e)) for e in grid):
        raise ValueError(f"eta grid must be positive finite step sizes, got {grid}")
    _metric(metric)
    if names is not None and len(names) != len(paths):
        raise ValueError("give one name per checkpoint")
    names = list(names) if names is not None else _unique_stems(paths)

    database = open_db(db)
    data = _load_split(database, split)
    selection = None
    if select_eta_on is not None:
        for candidate in dict.fromkeys([select_eta_on, "train"]):
            if candidate == split:
                continue
            try:
                selection = _load_split(database, candidate)
                break
            except EmptySplitError:
                continue

    baseline = _errors(data, data.batch64.positions, metric)
    result: dict[str, Any] = {
        "format": "ase-bptt-report",
        "format_version": 1,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "database": str(getattr(database, "name", db)),
        "split": split,
        "selection_split": selection.name if selection else None,
        "metric": metric,
        "settings": {
            "eta_grid": grid,
            "fire_fmax": fire_fmax,
            "fire_steps": fire_steps,
            "tol": tol,
            "max_steps": max_steps,
            "maxstep": maxstep,
            "batch_size": batch_size,
            "device": str(dev),
            "dtype": str(dt).replace("torch.", ""),
        },
        "n_structures": len(data),
        "label_counts": {lab: data.labels.count(lab) for lab in sorted(set(data.labels))},
        "structures": [
            {"traj_id": t, "label": lab, "n_atoms": len(a)}
            for t, lab, a in zip(data.traj_ids, data.labels, data.initial)
        ],
        "do_nothing": {"dq": _summary(baseline, data.labels), "per_structure": baseline},
        "checkpoints": [],
    }

    for path, name in zip(paths, names):
        ckpt = load_checkpoint(path)
        model = load_model(ckpt, device=dev, dtype=dt, name=str(path))
        model.eval()
        for a, tid in zip(data.initial, data.traj_ids):
            model.check_species(a.numbers, where=f"trajectory {tid} of {result['database']}")
        kw = dict(batch_size=batch_size, device=dev, dtype=dt)
        entry: dict[str, Any] = {
            "name": name,
            "path": str(path),
            "model": {"name": ckpt["model"].get("name"), "n_parameters": sum(p.numel() for p in model.parameters())},
            "relax": _jsonable(ckpt.get("relax")),
            "forces": _force_errors(
                model,
                database,
                split,
                batch_size=max(batch_size, 16),
                device=dev,
                dtype=dt,
                progress=progress,
                desc=f"{name}: force errors",
            ),
        }

        final, steps, conv = _fire_all(
            model,
            data,
            fmax=fire_fmax,
            steps=fire_steps,
            device=dev,
            dtype=dt,
            metric=metric,
            progress=progress,
            desc=f"{name}: ASE FIRE",
        )
        entry["fire"] = _method_entry(
            data, _errors(data, final, metric), frames=steps, converged=conv, fmax=fire_fmax, max_steps=fire_steps
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
            metric=metric,
            progress=progress,
            desc=f"{name}: eta curve",
            **kw,
        )
        curve = curves[0]
        entry["eta_curve"] = [{k: v for k, v in p.items() if k != "per_structure"} for p in curve]
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
            entry["selection_eta_curve"] = [{k: v for k, v in p.items() if k != "per_structure"} for p in sel_curve]

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
            entry["own_rule"] = _method_entry(
                data,
                _errors(data, pos, metric),
                frames=frames,
                converged=conv,
                rule=_rule_name(rule),
                eta=float(eta)
                if isinstance(eta, (float, int, torch.Tensor)) and torch.as_tensor(eta).numel() == 1
                else None,
                tol=own_tol,
                max_steps=own_max,
            )
        entry["history"] = _jsonable((ckpt.get("metadata") or {}).get("history"))
        result["checkpoints"].append(entry)

    if out_dir is not None:
        from ase_bptt.train.report import write_report

        result["files"] = {k: str(v) for k, v in write_report(result, out_dir).items()}
        # Rewrite so report.json also lists its sibling files.
        write_report(result, out_dir)
    return result


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p) for p in paths]

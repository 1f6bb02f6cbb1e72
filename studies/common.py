"""Helpers the research scripts share: settings switches, a timed log, no-grad rollout errors, the fixed-step
eta curve of the paper's protocol, and Markdown tables.

``eta_curve``/``stable_eta`` are the paper-reproduction protocol (the smallest eta within a slack of the best
on val, measured in :func:`stable_eta`'s docstring); the package's own grid search (``finetune``'s eta on the
train split) is :func:`ase_bptt.train.finetune.grid_search_eta`. The committed results were made with these.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ase_bptt import metrics
from ase_bptt.relax import FixedStep, rollout, rule_from_relax_settings
from ase_bptt.train.presets import FIRE_TOL

__all__ = [
    "Log",
    "eta_curve",
    "eta_of",
    "relax_rule",
    "fmt",
    "model_options",
    "per_label",
    "rollout_errors",
    "stable_eta",
    "table",
]


def model_options(
    s: Any,
    model: str,
    quick: bool,
    adapt_mi: dict[str, Any],
    force_weight: float | None,
    step: str = "fixed",
    proximal: float | None = None,
    energy_weight: float | None = None,
) -> Any:
    """``--model``, ``--force-weight``, ``--step``, ``--proximal`` and ``--energy-weight`` applied to a
    Settings dataclass (also generalisation.py's).

    ``adapt_mi``: the fields ADAPT-MI replaces in a full run; a quick run keeps its sizes and only
    switches the model. ``step="fire"``: BPTT through the differentiable FIRE (no eta, ``FIRE_TOL``).
    """
    if model == "adapt-mi":
        s = replace(s, **adapt_mi) if not quick else replace(s, model={**s.model, "model_name": "adapt-mi"})
    if force_weight is not None:
        s = replace(s, finetune={**s.finetune, "force_weight": force_weight})
    if proximal is not None:
        s = replace(s, finetune={**s.finetune, "proximal": proximal})
    if energy_weight is not None:
        s = replace(s, finetune={**s.finetune, "energy_weight": energy_weight})
    if step == "fire":
        s = replace(s, finetune={**s.finetune, "step": "fire", "eta": None, "tol": FIRE_TOL})
    return s


class Log:
    """Prints stages with elapsed time and keeps them for the report."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f} s] {text}"
        print(line, flush=True)
        self.lines.append(line)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def eta_of(rule) -> float | None:
    eta = getattr(rule, "eta", None)
    if eta is None or callable(eta):
        return None
    return float(eta.detach()) if isinstance(eta, torch.Tensor) else float(eta)


def relax_rule(ckpt: dict):
    """The checkpoint's step rule, tol and frame limit (as a user of the tuned model gets them)."""
    rule, tol, max_steps = rule_from_relax_settings(ckpt["relax"])
    return rule, float(1e-3 if tol is None else tol), int(75 if max_steps is None else max_steps)


@torch.no_grad()
def rollout_errors(
    model, data, rule, *, tol: float, max_steps: int, metric: str = "dq", batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per-structure Dq (or MSE) and frames of no-grad rollouts over a RelaxationSet."""
    model.eval()
    rule.eval()
    fn = metrics.dq if metric == "dq" else metrics.mse
    errors, frames = [], []
    for start in range(0, len(data), batch_size):
        batch, relaxed = data.take(torch.arange(start, min(start + batch_size, len(data))))
        res = rollout(model, batch, rule, tol=tol, max_steps=max_steps)
        errors.append(fn(res.positions.double(), relaxed.double(), batch.to(dtype=torch.float64)))
        frames.append(res.n_frames)
    return torch.cat(errors).numpy(), torch.cat(frames).numpy()


def eta_curve(
    model,
    data,
    grid,
    *,
    metric: str,
    maxstep: float = 0.2,
    momentum: float = 0.0,
    anneal: float = 1.0,
    tol: float = 1e-3,
    max_steps: int = 75,
) -> dict[float, float]:
    """Mean error of fixed-step rollouts for each eta of ``grid``."""
    out = {}
    for eta in grid:
        rule = FixedStep(float(eta), maxstep=maxstep, momentum=momentum, anneal=anneal)
        err, _ = rollout_errors(model, data, rule, tol=tol, max_steps=max_steps, metric=metric)
        out[float(eta)] = float(np.mean(err)) if np.all(np.isfinite(err)) else math.inf
    return out


def stable_eta(curve: dict[float, float], slack: float) -> float:
    """The smallest eta whose val error is within ``slack`` (relative) of the best.

    BPTT at the val-best eta of a flat curve sits close to the stability limit
    of the fixed-step map (about 2 / largest Hessian eigenvalue): training then
    makes the forces larger and the rollouts oscillate or diverge (measured:
    eta 0.065 on a curve flat from 0.05 to 0.1 gave train Dq 80-130 within
    four epochs). A smaller eta that is nearly as good keeps a margin.
    """
    best = min(v for v in curve.values() if math.isfinite(v))
    return min(e for e, v in curve.items() if math.isfinite(v) and v <= best * (1.0 + slack))


def per_label(values, labels) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for v, lab in zip(values, labels):
        groups.setdefault(lab, []).append(float(v))
    return {lab: float(np.mean(v)) for lab, v in sorted(groups.items())}


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "diverged"
        if x != 0 and abs(x) < 1:
            return f"{x:.3g}"
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

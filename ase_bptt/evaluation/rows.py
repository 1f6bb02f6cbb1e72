"""The rows of an evaluation report: one per method, as every table and plot shows them.

The evaluation's result dict (``report.json``) holds per-method entries; these
helpers turn them into rows (:func:`method_rows`), format numbers and tables,
and normalise a checkpoint's training history for its plot. report.py, plots.py
and compare.py read the result through them, so a method has one label everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["PLOT_FILES", "METHODS", "method_rows", "method_label", "fmt", "format_table", "history_series"]

#: The PNG files every report writes, by role.
#: Drawn by :mod:`ase_bptt.evaluation.plots`.
PLOT_FILES = {
    "paired": "dq_paired.png",
    "per_label": "dq_per_label.png",
    "eta_curve": "eta_curve.png",
    "training": "training_curves.png",
}

# Methods a checkpoint entry may carry, in the order tables show them, with
# the label a reader sees and a short one for plots.
METHODS = (
    ("fire", "ASE FIRE", "FIRE"),
    ("fixed_step_selected", "fixed step, eta chosen on {chosen_on}", "fixed step ({chosen_on})"),
    (
        "fixed_step_perfect_information",
        "fixed step, eta chosen on {chosen_on} (perfect information)",
        "fixed step ({chosen_on}, perfect inf.)",
    ),
    # The relaxation the checkpoint stores (fine-tuning exports the one chosen on val): what a user's
    # `ase-bptt relax` and LearnedStepOptimizer run.
    ("own_rule", "as exported ({rule})", "as exported"),
)


# --------------------------------------------------------------------- rows
def method_label(key: str, entry: Mapping[str, Any], *, short: bool = False) -> str:
    template = {k: (long, brief) for k, long, brief in METHODS}[key][int(short)]
    return template.format(chosen_on=entry.get("chosen_on", "?"), rule=entry.get("rule", "?"))


def _row(
    key: str, method: str, short: str, model: str, entry: Mapping[str, Any], forces: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    dq, basin, forces = entry.get("dq"), entry.get("correct_basin") or {}, forces or {}
    return {
        "key": key,
        "method": method,
        "short": short,
        "model": model,
        "eta": entry.get("eta"),
        "n": entry.get("n_evaluated", len(entry.get("per_structure") or [])),
        "dq_mean": dq["mean"] if dq else None,
        "dq_median": dq["median"] if dq else None,
        "basin": basin.get("fraction"),
        "frames_mean": entry.get("frames_mean"),
        "per_label": {k: v["mean"] for k, v in dq["per_label"].items()} if dq else {},
        "per_label_basin": dict(basin.get("per_label", {})),
        "force_mae": forces.get("mae"),
        "energy_mae": forces.get("energy_mae_mev_per_atom"),
    }


def method_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method: do nothing, ASE FIRE with each baseline calculator, then each (checkpoint, method).

    Each row: ``key`` (the method's key in the result), ``method``, ``short``
    (for plots), ``model``, ``eta`` (or None), ``n`` (structures scored),
    ``dq_mean``, ``dq_median`` (None when a baseline relaxed none),
    ``basin`` (fraction in the reference's basin), ``frames_mean`` (or
    None), ``per_label`` (label -> mean Dq), ``per_label_basin``, and the
    model's ``force_mae`` (eV/A) and ``energy_mae`` (meV/atom) on the split's
    frames (None for rows without a checkpoint).
    """
    rows = [_row("do_nothing", "do nothing (initial structure)", "do nothing", "-", result["do_nothing"])]
    rows[0]["frames_mean"] = 0.0
    for b in result.get("baselines", []):
        label = f"ASE FIRE with {b['name']}"
        rows.append(_row("baseline", label, f"FIRE with {b['name']}", b["calculator"], b, b.get("forces")))
    for ck in result["checkpoints"]:
        for key, _, _ in METHODS:
            entry = ck.get(key)
            if entry:
                label, short = method_label(key, entry), method_label(key, entry, short=True)
                rows.append(_row(key, label, f"{ck['name']}: {short}", ck["name"], entry, ck.get("forces")))
    return rows


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e5):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(header: list[str], rows: Iterable[list[Any]], *, markdown: bool = True) -> str:
    """A plain-text or Markdown table with aligned columns."""
    body = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    out = [line(header)]
    if markdown:
        out.append(
            "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in body)
    return "\n".join(out)


# ------------------------------------------------------------------ history
def history_series(history: Any) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Normalise a checkpoint's ``metadata["history"]`` into plottable series.

    Accepts a list of per-epoch dicts, or a dict of phase name -> such a list
    (e.g. ``{"pretrain": [...], "finetune": [...]}``), or a dict of metric ->
    list of numbers. Returns ``{phase: {metric: [(x, y), ...]}}`` with x the
    ``epoch`` value when present, else the entry's index. Non-numeric and
    non-finite values are dropped.
    """

    def number(v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        v = float(v)
        return v if math.isfinite(v) else None

    def from_records(records: list) -> dict[str, list[tuple[float, float]]]:
        series: dict[str, list[tuple[float, float]]] = {}
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping):
                continue
            x = number(rec.get("epoch"))
            x = float(i) if x is None else x
            for k, v in rec.items():
                y = number(v)
                if k in ("epoch", "step", "batch") or y is None:
                    continue
                series.setdefault(str(k), []).append((x, y))
        return series

    if not history:
        return {}
    if isinstance(history, list):
        s = from_records(history)
        return {"training": s} if s else {}
    if isinstance(history, Mapping):
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        flat: dict[str, list[tuple[float, float]]] = {}
        for k, v in history.items():
            if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v):
                s = from_records(v)
                if s:
                    out[str(k)] = s
            elif isinstance(v, list):
                pts = [(float(i), y) for i, y in enumerate(map(number, v)) if y is not None]
                if pts:
                    flat[str(k)] = pts
        if flat:
            out["training"] = flat
        return out
    return {}

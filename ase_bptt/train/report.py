"""Evaluation reports: Markdown, JSON and PNG plots from an ``evaluate`` result.

The result dict (see :func:`ase_bptt.train.evaluate.evaluate`) is the single
source of truth: ``report.json`` is that dict, ``report.md`` and the plots are
views of it, so every number a reader sees can be traced back to the JSON.
Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PLOT_FILES",
    "summary_text",
    "write_report",
    "method_rows",
    "format_table",
    "demo_rows",
    "history_series",
]

#: The PNG files every report writes, by role.
PLOT_FILES = {
    "before_after": "dq_before_after.png",
    "eta_curve": "eta_curve.png",
    "training": "training_curves.png",
}

# Methods a checkpoint entry may carry, in the order tables show them, with
# the label a reader sees.
_METHODS = (
    ("fire", "ASE FIRE"),
    ("fixed_step_selected", "fixed step, eta chosen on {chosen_on}"),
    ("fixed_step_perfect_information", "fixed step, eta chosen on {chosen_on} (perfect information)"),
    ("own_rule", "own step rule ({rule})"),
)


# --------------------------------------------------------------------- rows
def _method_label(key: str, entry: Mapping[str, Any]) -> str:
    template = dict(_METHODS)[key]
    return template.format(chosen_on=entry.get("chosen_on", "?"), rule=entry.get("rule", "?"))


def method_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (checkpoint, method), plus the do-nothing baseline first.

    Each row: ``method``, ``model``, ``eta`` (or None), ``dq_mean``,
    ``dq_median``, ``frames_mean`` (or None), ``key`` (the method's key in
    the result), ``per_label`` (label -> mean Dq).
    """
    base = result["do_nothing"]
    rows = [
        {
            "key": "do_nothing",
            "method": "do nothing (initial structure)",
            "model": "-",
            "eta": None,
            "dq_mean": base["dq"]["mean"],
            "dq_median": base["dq"]["median"],
            "frames_mean": 0.0,
            "per_label": {k: v["mean"] for k, v in base["dq"]["per_label"].items()},
        }
    ]
    for ck in result["checkpoints"]:
        for key, _ in _METHODS:
            entry = ck.get(key)
            if not entry:
                continue
            rows.append(
                {
                    "key": key,
                    "method": _method_label(key, entry),
                    "model": ck["name"],
                    "eta": entry.get("eta"),
                    "dq_mean": entry["dq"]["mean"],
                    "dq_median": entry["dq"]["median"],
                    "frames_mean": entry.get("frames_mean"),
                    "per_label": {k: v["mean"] for k, v in entry["dq"]["per_label"].items()},
                }
            )
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
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
    body = [[_fmt(c) for c in r] for r in rows]
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


def demo_rows(result: Mapping[str, Any], *, pretrained: str, finetuned: str) -> list[list[Any]]:
    """The demo's Dq table: do nothing / ASE FIRE / best fixed step / BPTT.

    Args:
        result: an ``evaluate`` result holding both checkpoints.
        pretrained: ``name`` of the force-matched checkpoint (FIRE and fixed
            steps are run with it, as in the paper's baselines).
        finetuned: ``name`` of the BPTT fine-tuned checkpoint.

    Returns:
        Rows ``[method, model, eta, Dq mean, Dq median, frames]``.
    """
    by_name = {ck["name"]: ck for ck in result["checkpoints"]}
    pre, fine = by_name[pretrained], by_name[finetuned]
    base = result["do_nothing"]["dq"]
    rows: list[list[Any]] = [["do nothing", "-", None, base["mean"], base["median"], 0.0]]

    def add(label: str, ck: Mapping[str, Any], key: str) -> None:
        entry = ck.get(key)
        if entry:
            rows.append(
                [
                    label,
                    ck["name"],
                    entry.get("eta"),
                    entry["dq"]["mean"],
                    entry["dq"]["median"],
                    entry.get("frames_mean"),
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


# -------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_before_after(result: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    initial = result["do_nothing"]["per_structure"]
    fig, ax = plt.subplots(figsize=(6, 5))
    markers = "osD^v<>px*"
    i = 0
    for ck in result["checkpoints"]:
        for key, _ in _METHODS:
            entry = ck.get(key)
            # The honest fixed step is enough here; the perfect-information one is in the tables.
            if not entry or (key == "fixed_step_perfect_information" and ck.get("fixed_step_selected")):
                continue
            label = f"{ck['name']}: {_method_label(key, entry)}"
            ax.scatter(initial, entry["per_structure"], s=18, alpha=0.75, marker=markers[i % len(markers)], label=label)
            i += 1
    finite = [v for v in initial if math.isfinite(v) and v > 0]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="no change (y = x)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("initial Dq (amu$^{1/2}$ Å)")
    ax.set_ylabel("final Dq (amu$^{1/2}$ Å)")
    ax.set_title(f"Dq before and after relaxation ({result['split']} split, {result['n_structures']} structures)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_eta_curve(result: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for ck in result["checkpoints"]:
        curve = ck["eta_curve"]
        etas = [p["eta"] for p in curve]
        ax.plot(etas, [p["dq"]["mean"] for p in curve], "o-", label=f"{ck['name']} (mean, {result['split']})")
        sel = ck.get("selection_eta_curve")
        if sel:
            ax.plot(
                [p["eta"] for p in sel],
                [p["dq"]["mean"] for p in sel],
                "x:",
                label=f"{ck['name']} (mean, {ck['fixed_step_selected']['chosen_on']})",
            )
        own = ck.get("own_rule")
        if own and own.get("eta") is not None:
            ax.scatter([own["eta"]], [own["dq"]["mean"]], marker="*", s=120, zorder=5, label=f"{ck['name']} own rule")
    ax.axhline(result["do_nothing"]["dq"]["mean"], color="grey", ls="--", lw=1, label="do nothing")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fixed step size eta (Å$^2$/eV)")
    ax.set_ylabel("mean Dq (amu$^{1/2}$ Å)")
    ax.set_title("Fixed-step relaxation: Dq against step size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: History entries that are bookkeeping, not learning curves.
_NOT_CURVES = ("elapsed", "lr", "partial_epoch", "skipped", "frames", "converged", "eta", "step")
#: Panels of the training plot: (title, substrings selecting the metrics).
_CURVE_KINDS = (
    ("loss", ("loss",)),
    ("force error (eV/A)", ("force",)),
    ("energy error (meV/atom)", ("energy",)),
    ("structure error (Dq or MSE)", ("dq", "mse")),
)


def _curve_panels(result: Mapping[str, Any]) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    panels = []
    for ck in result["checkpoints"]:
        for phase, series in history_series(ck.get("history")).items():
            kept = {
                m: pts
                for m, pts in series.items()
                if not any(m == k or m.endswith("_" + k) or m.startswith(k) for k in _NOT_CURVES)
            }
            for title, keys in _CURVE_KINDS:
                chosen = {m: pts for m, pts in kept.items() if any(k in m for k in keys)}
                for m in chosen:
                    kept.pop(m)
                if chosen:
                    panels.append((f"{ck['name']} ({phase}): {title}", chosen))
            if kept:
                panels.append((f"{ck['name']} ({phase}): other", kept))
    return panels


def _plot_training(result: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    panels = _curve_panels(result)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no training history in these checkpoints", ha="center", va="center")
    else:
        cols = 2 if len(panels) > 1 else 1
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, (title, series) in zip(axes.flat, panels):
            positive = all(y > 0 for pts in series.values() for _, y in pts)
            for metric, pts in sorted(series.items()):
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, label=metric)
            if positive:
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- markdown
def _markdown(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# ase-bptt evaluation report",
        "",
        f"- database: `{result['database']}`",
        f"- split: **{result['split']}**, {result['n_structures']} converged trajectories "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(result['label_counts'].items()))})",
        "- Dq = sqrt(sum_j m_j |X*_j - X_j|^2) in amu^1/2 A, minimum image"
        + (" (plus MSE, A^2 per atom)" if result.get("loss") == "mse" else ""),
        f"- ASE FIRE: fmax {s['fire_fmax']} eV/A, at most {s['fire_steps']} steps, one structure at a time through "
        "`BPTTCalculator`.",
        f"- fixed step: eta grid {', '.join(_fmt(e, 3) for e in s['eta_grid'])} A^2/eV, tol {s['tol']} A, "
        f"at most {s['max_steps']} frames, maxstep {s['maxstep']} A.",
        f"- created {result['created']} by ase-bptt {result['package_version']}, device {s['device']}, {s['dtype']}.",
        "",
        "The eta marked *perfect information* is chosen on the evaluated split itself (as the paper's Table 6 did), "
        "so it is an optimistic bound, not a deployable setting."
        + (
            f" The eta chosen on the **{result['selection_split']}** split is the honest fixed-step baseline."
            if result.get("selection_split")
            else ""
        ),
        "",
        "## Dq by method",
        "",
    ]
    rows = method_rows(result)
    lines.append(
        format_table(
            ["method", "model", "eta", "Dq mean", "Dq median", "frames (mean)"],
            [[r["method"], r["model"], r["eta"], r["dq_mean"], r["dq_median"], r["frames_mean"]] for r in rows],
        )
    )
    labels = sorted(result["label_counts"])
    if labels:
        lines += ["", "## Mean Dq per label", ""]
        header = ["method", "model", *labels]
        lines.append(
            format_table(header, [[r["method"], r["model"], *(r["per_label"].get(l) for l in labels)] for r in rows])
        )
    lines += ["", "## Force errors on the split's frames", ""]
    lines.append(
        format_table(
            ["model", "frames", "MAE (eV/A)", "RMSE (eV/A)", "L2 (eV/A)", "energy MAE (meV/atom)"],
            [
                [
                    ck["name"],
                    ck["forces"]["n_frames"],
                    ck["forces"]["mae"],
                    ck["forces"]["rmse"],
                    ck["forces"]["l2"],
                    ck["forces"].get("energy_mae_mev_per_atom"),
                ]
                for ck in result["checkpoints"]
            ],
        )
    )
    for ck in result["checkpoints"]:
        lines += ["", f"## Eta curve: {ck['name']}", "", f"checkpoint `{ck['path']}`", ""]
        sel = {p["eta"]: p["dq"]["mean"] for p in ck.get("selection_eta_curve") or []}
        header = ["eta", f"Dq mean ({result['split']})", f"Dq median ({result['split']})", "frames (mean)", "converged"]
        if sel:
            header.append(f"Dq mean ({ck['fixed_step_selected']['chosen_on']})")
        table = []
        for p in ck["eta_curve"]:
            row = [p["eta"], p["dq"]["mean"], p["dq"]["median"], p["frames_mean"], p["converged_fraction"]]
            if sel:
                row.append(sel.get(p["eta"]))
            table.append(row)
        lines.append(format_table(header, table))
        if ck.get("fire"):
            f = ck["fire"]
            lines += [
                "",
                f"ASE FIRE: {f['steps_mean']:.1f} steps on average, {100 * f['converged_fraction']:.0f}% reached fmax.",
            ]
    lines += ["", "## Plots", ""]
    lines += [f"![{role}]({name})" for role, name in PLOT_FILES.items()]
    lines.append("")
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(result: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``out_dir``.

    Returns:
        ``{"markdown", "json", "before_after", "eta_curve", "training"}`` -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    _write_atomic(paths["json"], json.dumps(result, indent=1, default=_json_default, allow_nan=True) + "\n")
    for role, name in PLOT_FILES.items():
        paths[role] = out / name
    _plot_before_after(result, paths["before_after"])
    _plot_eta_curve(result, paths["eta_curve"])
    _plot_training(result, paths["training"])
    _write_atomic(paths["markdown"], _markdown(result))
    return paths


# --------------------------------------------------------------- summaries
def summary_text(result: Mapping[str, Any]) -> str:
    """A plain-text Dq table (and force errors) of an ``evaluate`` result, for the terminal."""
    rows = method_rows(result)
    head = f"{result['split']} split: {result['n_structures']} structures; {result['metric']} in " + (
        "amu^1/2 A" if result["metric"] == "dq" else "A^2 per atom"
    )
    table = format_table(
        ["method", "model", "eta", "mean", "median", "frames"],
        [[r["method"], r["model"], r["eta"], r["dq_mean"], r["dq_median"], r["frames_mean"]] for r in rows],
        markdown=False,
    )
    forces = "\n".join(
        f"force errors of {ck['name']} on {ck['forces']['n_frames']} frames: MAE {_fmt(ck['forces']['mae'])} eV/A, "
        f"RMSE {_fmt(ck['forces']['rmse'])} eV/A"
        for ck in result["checkpoints"]
    )
    return f"{head}\n{table}\n{forces}"

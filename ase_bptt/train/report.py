"""Evaluation reports: Markdown, JSON and PNG plots from an ``evaluate`` result.

The result dict (see :func:`ase_bptt.train.evaluate.evaluate`) is the single
source of truth: ``report.json`` is that dict, ``report.md`` and the plots are
views of it, so every number a reader sees can be traced back to the JSON.
The plots are drawn by :mod:`ase_bptt.train.plots`.
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
    "report_files",
    "method_rows",
    "per_element",
    "format_table",
    "demo_rows",
    "history_series",
]

#: The PNG files every report writes, by role.
#: Drawn by :mod:`ase_bptt.train.plots`.
PLOT_FILES = {
    "paired": "dq_paired.png",
    "per_label": "dq_per_label.png",
    "eta_curve": "eta_curve.png",
    "training": "training_curves.png",
}

# Methods a checkpoint entry may carry, in the order tables show them, with
# the label a reader sees and a short one for plots.
_METHODS = (
    ("fire", "ASE FIRE", "FIRE"),
    ("fixed_step_selected", "fixed step, eta chosen on {chosen_on}", "fixed step ({chosen_on})"),
    (
        "fixed_step_perfect_information",
        "fixed step, eta chosen on {chosen_on} (perfect information)",
        "fixed step ({chosen_on}, perfect inf.)",
    ),
    ("own_rule", "own step rule ({rule})", "own rule"),
)


# --------------------------------------------------------------------- rows
def _method_label(key: str, entry: Mapping[str, Any], *, short: bool = False) -> str:
    template = {k: (long, brief) for k, long, brief in _METHODS}[key][int(short)]
    return template.format(chosen_on=entry.get("chosen_on", "?"), rule=entry.get("rule", "?"))


def _row(key: str, method: str, short: str, model: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    dq, basin = entry.get("dq"), entry.get("correct_basin") or {}
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
    }


def method_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method: do nothing, ASE FIRE with each baseline calculator, then each (checkpoint, method).

    Each row: ``key`` (the method's key in the result), ``method``, ``short``
    (for plots), ``model``, ``eta`` (or None), ``n`` (structures scored),
    ``dq_mean``, ``dq_median`` (None when a baseline relaxed none),
    ``basin`` (fraction in the reference's basin), ``frames_mean`` (or
    None), ``per_label`` (label -> mean Dq), ``per_label_basin``.
    """
    rows = [_row("do_nothing", "do nothing (initial structure)", "do nothing", "-", result["do_nothing"])]
    rows[0]["frames_mean"] = 0.0
    for b in result.get("baselines", []):
        rows.append(_row("baseline", f"ASE FIRE with {b['name']}", f"FIRE with {b['name']}", b["calculator"], b))
    for ck in result["checkpoints"]:
        for key, _, _ in _METHODS:
            entry = ck.get(key)
            if entry:
                label, short = _method_label(key, entry), _method_label(key, entry, short=True)
                rows.append(_row(key, label, f"{ck['name']}: {short}", ck["name"], entry))
    return rows


def per_element(result: Mapping[str, Any]) -> dict[str, Any]:
    """Mean Dq of every method over the structures that contain each element (``report.json``'s ``per_element``).

    Returns:
        ``{"counts": {element: structures}, "methods": [{"method", "model",
        "dq": {element: mean}}]}`` with the methods of :func:`method_rows`;
        ``{}`` for a result whose structures do not list their elements.
    """
    elements = [s.get("elements") for s in result.get("structures", [])]
    if not elements or any(e is None for e in elements):
        return {}
    counts: dict[str, int] = {}
    for els in elements:
        for e in els:
            counts[e] = counts.get(e, 0) + 1
    entries = [result["do_nothing"], *result.get("baselines", [])]
    entries += [ck[key] for ck in result["checkpoints"] for key, _, _ in _METHODS if ck.get(key)]
    methods = []
    for row, entry in zip(method_rows(result), entries):
        values = entry.get("per_structure") or []
        means = {}
        for e in sorted(counts):
            picked = [v for v, els in zip(values, elements) if e in els and v is not None]
            if picked:
                means[e] = sum(picked) / len(picked)
        methods.append({"method": row["method"], "model": row["model"], "dq": means})
    return {"counts": dict(sorted(counts.items())), "methods": methods}


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


# ----------------------------------------------------------------- markdown
def _markdown(result: Mapping[str, Any], plots: bool = True) -> str:
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
        )
        + (f" **Note:** {result['selection_note']}." if result.get("selection_note") else ""),
        "",
        "## Dq by method",
        "",
    ]
    rows = method_rows(result)
    basin = f"in basin (<= {s['basin_rms']:g} A)"
    lines.append(
        format_table(
            ["method", "model", "eta", "n", "Dq mean", "Dq median", basin, "frames (mean)"],
            [
                [r["method"], r["model"], r["eta"], r["n"], r["dq_mean"], r["dq_median"], r["basin"], r["frames_mean"]]
                for r in rows
            ],
        )
    )
    lines += [
        "",
        f"*In basin*: the fraction of structures whose final positions lie within {s['basin_rms']:g} A RMS per atom "
        "(minimum image) of the reference relaxed structure, i.e. that ended in the reference's minimum.",
    ]
    labels = sorted(result["label_counts"])
    if labels:
        for title, key in (
            ("Mean Dq per label", "per_label"),
            (f"Fraction in the reference's basin per label (<= {s['basin_rms']:g} A RMS)", "per_label_basin"),
        ):
            lines += ["", f"## {title}", ""]
            lines.append(
                format_table(
                    ["method", "model", *labels],
                    [[r["method"], r["model"], *(r[key].get(l) for l in labels)] for r in rows],
                )
            )
    lines += _worse_labels_section(result)
    lines += _not_evaluated(result)
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
    if plots:
        lines += [f"### {_PLOT_CAPTIONS[role]}\n\n![{role}]({name})\n" for role, name in PLOT_FILES.items()]
    else:
        lines.append("Not drawn (`--no-plots`); every number behind them is in report.json.")
    return "\n".join(lines)


_PLOT_CAPTIONS = {
    "paired": "Per structure: the pretrained model's best fixed step (x) against the tuned model (y); "
    "below the diagonal = the tuning helped",
    "per_label": "Mean Dq of every method, per label",
    "eta_curve": "Fixed-step Dq against eta; the circled point is the eta chosen on the selection split",
    "training": "Training curves",
}


def _worse_labels_section(result: Mapping[str, Any]) -> list[str]:
    """The report.md section (lines): a table of the worse labels, "none", or why nothing was compared."""
    lines = ["", "## Labels where the tuned model is worse than the pretrained best fixed step", ""]
    worse = result.get("worse_labels")
    if worse is None:
        lines.append(
            "Not compared: give the pretrained checkpoint first and at least one tuned checkpoint with a step rule."
        )
        return lines
    if not worse:
        lines.append("none: on every label the tuned model's own step rule beats the pretrained best fixed step.")
        return lines
    chosen_on = worse[0].get("fixed_chosen_on")
    lines.append(
        f"Mean {'Dq' if result.get('metric', 'dq') == 'dq' else 'MSE'} per label: the tuned model's own step rule "
        f"against the pretrained model's fixed step with the eta chosen on {chosen_on}."
    )
    lines.append("")
    lines.append(
        format_table(
            ["label", "model", "n", "tuned (own rule)", "pretrained, best fixed step", "ratio"],
            [[w["label"], w["model"], w["n"], w["bptt"], w["fixed"], w["ratio"]] for w in worse],
        )
    )
    return lines


def _not_evaluated(result: Mapping[str, Any]) -> list[str]:
    """Markdown listing the structures left out of every row, and those a baseline could not relax."""
    lines: list[str] = []
    if result.get("skipped"):
        lines += ["", "## Structures not evaluated", ""]
        lines.append(
            f"{len(result['skipped'])} structure(s) of the split are left out of every row: a checkpoint was never "
            "trained on one of their elements."
        )
        lines += [
            "",
            format_table(
                ["trajectory", "label", "why"], [[k["traj_id"], k["label"], k["reason"]] for k in result["skipped"]]
            ),
        ]
    failed = [(b["name"], f) for b in result.get("baselines", []) for f in b["failed"]]
    if failed:
        lines += ["", "## Structures a baseline could not relax", ""]
        lines.append("These count only in that baseline's row (its column *n*); every other row scores them.")
        lines += [
            "",
            format_table(
                ["baseline", "trajectory", "label", "why"],
                [[n, f["traj_id"], f["label"], f["reason"]] for n, f in failed],
            ),
        ]
    return lines


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_files(out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """The files :func:`write_report` writes: ``{"markdown", "json", *PLOT_FILES}`` -> path."""
    out = Path(out_dir)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    if plots:
        paths.update({role: out / name for role, name in PLOT_FILES.items()})
    return paths


def write_report(result: Mapping[str, Any], out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (``plots``) the PNG plots into ``out_dir``.

    ``plots=False`` skips the PNGs: drawing them was ~85% of a small evaluation's time.

    Returns:
        :func:`report_files`.
    """
    from ase_bptt.train.config import to_jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = report_files(out, plots=plots)
    _write_atomic(paths["json"], json.dumps(to_jsonable(result), indent=1, default=repr, allow_nan=True) + "\n")
    if plots:
        from ase_bptt.train.plots import write_plots

        write_plots(result, out)
    _write_atomic(paths["markdown"], _markdown(result, plots))
    return paths


# --------------------------------------------------------------- summaries
def summary_text(result: Mapping[str, Any]) -> str:
    """A plain-text Dq table (and force errors) of an ``evaluate`` result, for the terminal."""
    rows = method_rows(result)
    head = f"{result['split']} split: {result['n_structures']} structures; {result['metric']} in " + (
        "amu^1/2 A" if result["metric"] == "dq" else "A^2 per atom"
    )
    table = format_table(
        ["method", "model", "eta", "n", "mean", "median", "in basin", "frames"],
        [
            [r["method"], r["model"], r["eta"], r["n"], r["dq_mean"], r["dq_median"], r["basin"], r["frames_mean"]]
            for r in rows
        ],
        markdown=False,
    )
    forces = "\n".join(
        f"force errors of {ck['name']} on {ck['forces']['n_frames']} frames: MAE {_fmt(ck['forces']['mae'])} eV/A, "
        f"RMSE {_fmt(ck['forces']['rmse'])} eV/A"
        for ck in result["checkpoints"]
    )
    notes = [f"in basin: final structure within {result['settings']['basin_rms']:g} A RMS per atom of the reference"]
    if result.get("skipped"):
        notes.append(
            f"{len(result['skipped'])} structure(s) not evaluated (see report.md): {result['skipped'][0]['reason']}"
        )
    return "\n".join([head, table, *notes, forces])

"""Evaluation reports: Markdown, JSON and PNG plots from an ``evaluate`` result.

The result dict (see :func:`ase_bptt.evaluation.pipeline.evaluate`) is the single
source of truth: ``report.json`` is that dict, ``report.md`` and the plots are
views of it, so every number a reader sees can be traced back to the JSON.
The plots are drawn by :mod:`ase_bptt.evaluation.plots`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ase_bptt.evaluation.rows import PLOT_FILES, fmt, format_table, method_rows

__all__ = [
    "summary_text",
    "write_report",
    "report_files",
    "comparison_lines",
    "model_error_lines",
    "refinement_lines",
]


# ----------------------------------------------------------------- markdown
def _markdown(result: Mapping[str, Any], plots: bool = True) -> str:
    """report.md: the settings, the main table, then one section per view of the same numbers."""
    lines = [*_header_section(result), "", "## Dq by method", "", _method_table(result, markdown=True)]
    lines += [
        "",
        f"*In basin*: the fraction of structures whose final positions lie within {result['settings']['basin_rms']:g} "
        "A RMS per atom (minimum image) of the reference relaxed structure, i.e. that ended in the reference's "
        "minimum. *Force MAE* (eV/A) and *energy MAE* (meV/atom): the row's model on every frame of the split.",
    ]
    lines += _comparisons_section(result)
    lines += _refinement_section(result)
    lines += _per_label_sections(result)
    lines += _worse_labels_section(result)
    lines += _not_evaluated(result)
    lines += _force_errors_section(result)
    lines += _eta_curve_sections(result)
    lines += ["", "## Plots", ""]
    if plots:
        lines += [f"### {_PLOT_CAPTIONS[role]}\n\n![{role}]({name})\n" for role, name in PLOT_FILES.items()]
    else:
        lines.append("Not drawn (`--no-plots`); every number behind them is in report.json.")
    return "\n".join(lines)


def _header_section(result: Mapping[str, Any]) -> list[str]:
    s = result["settings"]
    return [
        "# ase-bptt evaluation report",
        "",
        f"- database: `{result['database']}`",
        f"- split: **{result['split']}**, {result['n_structures']} converged trajectories "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(result['label_counts'].items()))})",
        "- Dq = sqrt(sum_j m_j |X*_j - X_j|^2) in amu^1/2 A, minimum image"
        + (" (plus MSE, A^2 per atom)" if result.get("loss") == "mse" else ""),
        f"- ASE FIRE: fmax {s['fire_fmax']} eV/A, at most {s['fire_steps']} steps, one structure at a time through "
        "`BPTTCalculator`.",
        f"- fixed step: eta grid {', '.join(fmt(e, 3) for e in s['eta_grid'])} A^2/eV, tol {s['tol']} A, "
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
    ]


def _per_label_sections(result: Mapping[str, Any]) -> list[str]:
    labels = sorted(result["label_counts"])
    if not labels:
        return []
    rows, lines = method_rows(result), []
    basin = result["settings"]["basin_rms"]
    for title, key in (
        ("Mean Dq per label", "per_label"),
        (f"Fraction in the reference's basin per label (<= {basin:g} A RMS)", "per_label_basin"),
    ):
        lines += ["", f"## {title}", ""]
        table = [[r["method"], r["model"], *(r[key].get(label) for label in labels)] for r in rows]
        lines.append(format_table(["method", "model", *labels], table))
    return lines


def _force_errors_section(result: Mapping[str, Any]) -> list[str]:
    header = ["model", "frames", "MAE (eV/A)", "RMSE (eV/A)", "L2 (eV/A)", "energy MAE (meV/atom)"]
    rows = [
        [f["n_frames"], f["mae"], f["rmse"], f["l2"], f.get("energy_mae_mev_per_atom")]
        for f in (ck["forces"] for ck in result["checkpoints"])
    ]
    names = [ck["name"] for ck in result["checkpoints"]]
    table = format_table(header, [[name, *row] for name, row in zip(names, rows)])
    return ["", "## Force errors on the split's frames", "", table]


def _eta_curve_sections(result: Mapping[str, Any]) -> list[str]:
    lines = []
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
    return lines


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
    from ase_bptt.runs.config import to_jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = report_files(out, plots=plots)
    _write_atomic(paths["json"], json.dumps(to_jsonable(result), indent=1, default=repr, allow_nan=True) + "\n")
    if plots:
        from ase_bptt.evaluation.plots import write_plots

        write_plots(result, out)
    _write_atomic(paths["markdown"], _markdown(result, plots))
    return paths


# --------------------------------------------------------------- summaries
def _method_table(result: Mapping[str, Any], *, markdown: bool) -> str:
    """The main table: one row per method with Dq, basin, frames and the row model's force/energy errors."""
    basin = f"in basin (<= {result['settings']['basin_rms']:g} A)" if markdown else "in basin"
    what = "Dq" if result.get("metric", "dq") == "dq" else "MSE"
    return format_table(
        ["method", "model", "eta", "n", f"{what} mean", f"{what} median", basin, "frames", "force MAE", "energy MAE"],
        [
            [
                r["method"],
                r["model"],
                r["eta"],
                r["n"],
                r["dq_mean"],
                r["dq_median"],
                r["basin"],
                r["frames_mean"],
                r["force_mae"],
                r["energy_mae"],
            ]
            for r in method_rows(result)
        ],
        markdown=markdown,
    )


def comparison_lines(result: Mapping[str, Any], *, markdown: bool = False) -> list[str]:
    """The comparisons (``result["comparisons"]``) as a table: ratio of the means, median per-structure ratio and
    the fraction of structures improved; [] when there is nothing to compare."""
    comps = result.get("comparisons") or []
    if not comps:
        return []
    return format_table(
        ["model", "method", "against", "mean ratio", "median ratio", "improved", "n"],
        [
            [
                c["model"],
                c["method_label"],
                f"{c['against_model']}: {c['against_label']}",
                c["mean_ratio"],
                c["median_ratio"],
                _percent(c["improved"]),
                c["n"],
            ]
            for c in comps
        ],
        markdown=markdown,
    ).splitlines()


def model_error_lines(result: Mapping[str, Any]) -> list[str]:
    """Each tuned checkpoint's force and energy MAE against the first (pretrained) checkpoint's, as ratios, and
    how far every tuned universal MLIP's forces moved from its base model's on other elements (forgetting)."""
    cks = result["checkpoints"]
    out = [
        f"{ck['name']}: forgetting: |F - F_base| {1000 * f['mean']:.1f} meV/A on average (max {1000 * f['max']:.0f}) "
        f"against {f['against']} on {f['n_structures']} structures of other elements"
        for ck in cks
        if (f := ck.get("forgetting"))
    ]
    if len(cks) < 2:
        return out
    pre = cks[0]["forces"]
    for ck in cks[1:]:
        f = ck["forces"]
        parts = [f"force MAE {fmt(f['mae'])} eV/A ({_ratio(f['mae'], pre['mae'])} {cks[0]['name']}'s)"]
        e, e0 = f.get("energy_mae_mev_per_atom"), pre.get("energy_mae_mev_per_atom")
        if e is not None:
            parts.append(f"energy MAE {fmt(e, 2)} meV/atom ({_ratio(e, e0)} {cks[0]['name']}'s)")
        out.append(f"{ck['name']}: " + ", ".join(parts))
    return out


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base > 0:
        return "no ratio to"
    return f"{value / base:.2f}x"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _comparisons_section(result: Mapping[str, Any]) -> list[str]:
    table = comparison_lines(result, markdown=True)
    if not table:
        return []
    return [
        "",
        "## Comparisons, structure by structure",
        "",
        "*mean ratio*: the method's mean Dq over the other's; *median ratio*: the median of the per-structure "
        "ratios (a mean can hide a typical loss); *improved*: the fraction of structures with a lower Dq.",
        "",
        *table,
        *(["", *(f"- {line}" for line in model_error_lines(result))] if model_error_lines(result) else []),
    ]


def refinement_lines(result: Mapping[str, Any], *, markdown: bool = False) -> list[str]:
    """Reference steps each method's final structures still needed (``result["refinement"]``); [] without one."""
    ref = result.get("refinement")
    if not ref:
        return []
    rows = []
    for m in ref["methods"]:
        vs_fire = (m.get("vs_pretrained_fire") or {}).get("median_ratio")
        rows.append(
            [
                m["label"],
                m["steps_mean"],
                m["steps_median"],
                _percent(sum(m["converged"]) / len(m["converged"])),
                _mean(m["dq_after"]),
                m["vs_initial"]["median_ratio"],
                vs_fire,
            ]
        )
    head = (
        f"refined with {ref['calculator']} and ASE {ref['optimizer']} to fmax {ref['fmax']:g} eV/A "
        f"(at most {ref['max_steps']} steps)"
    )
    table = format_table(
        [
            "start",
            "steps mean",
            "steps median",
            "converged",
            "Dq after",
            "vs initial (median)",
            "vs pretrained FIRE (median)",
        ],
        rows,
        markdown=markdown,
    )
    return [head, "", *table.splitlines()] if markdown else [head, *table.splitlines()]


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def _refinement_section(result: Mapping[str, Any]) -> list[str]:
    lines = refinement_lines(result, markdown=True)
    if not lines:
        return []
    return [
        "",
        "## Reference steps still needed",
        "",
        *lines,
        "",
        "*vs initial*: median per-structure ratio of the steps against refining the initial structure (no "
        "pre-relaxation); *vs pretrained FIRE*: against refining the pretrained model's ASE FIRE result; "
        "*Dq after*: where the refinement ended against the reference relaxed structure.",
    ]


def summary_text(result: Mapping[str, Any]) -> str:
    """The terminal summary: the main table, the comparisons, the model errors and any refinement."""
    head = f"{result['split']} split: {result['n_structures']} structures; {result['metric']} in " + (
        "amu^1/2 A" if result["metric"] == "dq" else "A^2 per atom"
    )
    notes = [
        f"in basin: final structure within {result['settings']['basin_rms']:g} A RMS per atom of the reference; "
        "force MAE in eV/A, energy MAE in meV/atom on the split's frames"
    ]
    if result.get("skipped"):
        notes.append(
            f"{len(result['skipped'])} structure(s) not evaluated (see report.md): {result['skipped'][0]['reason']}"
        )
    parts = [head, _method_table(result, markdown=False), *notes]
    comps = comparison_lines(result)
    if comps:
        parts += ["", "structure by structure (median ratio: median of per-structure ratios):", *comps]
    parts += model_error_lines(result)
    refinement = refinement_lines(result)
    if refinement:
        parts += ["", *refinement]
    return "\n".join(parts)

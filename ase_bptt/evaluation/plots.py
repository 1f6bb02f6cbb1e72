"""The report's PNG plots, each drawn from the ``evaluate`` result dict and readable at its size in ``report.md``.

- ``dq_paired.png``: per structure, the pretrained model's best fixed step (x)
  against the tuned model (y); the diagonal is "no change", points below it
  are structures the tuning improved. Its data are ``result["paired"]``.
- ``dq_per_label.png``: mean Dq of every method (baselines included), one
  panel per label.
- ``eta_curve.png``: mean Dq against the fixed step size, with the eta chosen
  on the selection split marked.
- ``training_curves.png``: the checkpoints' training histories.

Matplotlib's Agg backend is used, so no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ase_bptt.evaluation.rows import PLOT_FILES, history_series, method_rows

__all__ = ["paired_data", "plot_paired", "plot_per_label", "plot_eta_curve", "plot_training", "write_plots"]

#: Dots per inch of every PNG; figure sizes below are in inches, so 8 in -> 880 px wide.
DPI = 110
_FONT = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_FONT)
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _best_fixed_key(ck: Mapping[str, Any]) -> str:
    return "fixed_step_selected" if ck.get("fixed_step_selected") else "fixed_step_perfect_information"


def _describe(key: str, entry: Mapping[str, Any]) -> str:
    if key == "own_rule":
        return f"own step rule ({entry.get('rule', '?')})"
    info = " (perfect information)" if key == "fixed_step_perfect_information" else ""
    return f"best fixed step, eta {entry['eta']:.3g} chosen on {entry['chosen_on']}{info}"


def _log_axes(ax, *, x: bool = True, y: bool = True) -> None:
    """Log scale with plain numbers (1, 2, 5, 10, ...) instead of 2x10^0 labels."""
    from matplotlib.ticker import FuncFormatter

    def plain(v: float, _pos: Any) -> str:
        return f"{v:g}"

    def some(v: float, _pos: Any) -> str:
        # Minor ticks: label only 2 and 5 of each decade, so labels never overlap.
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""

    if x:
        ax.set_xscale("log")
    if y:
        ax.set_yscale("log")
    for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
        if on:
            axis.set_major_formatter(FuncFormatter(plain))
            axis.set_minor_formatter(FuncFormatter(some))


def paired_data(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-structure pairs (pretrained model's best fixed step, tuned model) for the paired plot.

    The first checkpoint is the pretrained one; each later checkpoint with a
    step rule is a tuned one (its own rule; its best fixed step otherwise).
    With a single checkpoint, its own rule is compared with its fixed step.

    Returns:
        One series per tuned checkpoint: ``x_model``, ``x_method`` (the key
        of the method in the checkpoint's entry), ``x_description``, the same
        for y, ``traj_id``, ``label``, ``x``, ``y``.
    """
    cks = result["checkpoints"]
    if not cks:
        return []
    pre = cks[0]
    x_key = _best_fixed_key(pre)
    tuned = cks[1:] or ([pre] if pre.get("own_rule") else [])
    series = []
    for ck in tuned:
        y_key = "own_rule" if ck.get("own_rule") else _best_fixed_key(ck)
        series.append(
            {
                "x_model": pre["name"],
                "x_method": x_key,
                "x_description": _describe(x_key, pre[x_key]),
                "y_model": ck["name"],
                "y_method": y_key,
                "y_description": _describe(y_key, ck[y_key]),
                "traj_id": [s["traj_id"] for s in result["structures"]],
                "label": [s["label"] for s in result["structures"]],
                "x": list(pre[x_key]["per_structure"]),
                "y": list(ck[y_key]["per_structure"]),
            }
        )
    return series


def _label_colours(labels: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def plot_paired(result: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """Draw ``dq_paired.png``; returns the points drawn, per label, as ``{"label", "x", "y"}`` (for tests)."""
    plt = _pyplot()
    series = result.get("paired") or paired_data(result)
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(5.5 * max(len(series), 1), 5), squeeze=False)
    drawn: list[dict[str, Any]] = []
    colours = _label_colours(sorted(result["label_counts"]))
    what = "Dq" if result["metric"] == "dq" else "MSE"
    for ax, s in zip(axes.flat, series):
        for lab, colour in colours.items():
            pts = [(x, y) for x, y, l in zip(s["x"], s["y"], s["label"]) if l == lab]
            if not pts:
                continue
            coll = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, color=colour, alpha=0.8, label=lab)
            drawn.append({"label": lab, "x": coll.get_offsets()[:, 0].tolist(), "y": coll.get_offsets()[:, 1].tolist()})
        finite = [v for v in (*s["x"], *s["y"]) if v is not None and math.isfinite(v) and v > 0]
        if finite:
            lo, hi = min(finite) / 1.3, max(finite) * 1.3
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="no change")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            _log_axes(ax)
        better = sum(y < x for x, y in zip(s["x"], s["y"]))
        ax.set_xlabel(f"{s['x_model']}: {s['x_description']}\n{what} per structure")
        ax.set_ylabel(f"{s['y_model']}: {s['y_description']}\n{what} per structure")
        ax.set_title(f"below the diagonal: {s['y_model']} better ({better} of {len(s['x'])})")
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper left", fontsize=8)
    if not series:
        axes.flat[0].axis("off")
        axes.flat[0].text(0.5, 0.5, "no tuned checkpoint to compare", ha="center", va="center")
    _save(fig, path)
    return drawn


def plot_per_label(result: Mapping[str, Any], path: Path) -> None:
    """Draw ``dq_per_label.png``: one panel per label (and "all"), a horizontal bar per method."""
    plt = _pyplot()
    rows = method_rows(result)
    labels = ["all", *sorted(result["label_counts"])]
    cols = min(3, len(labels))
    nrows = math.ceil(len(labels) / cols)
    height = 0.28 * len(rows) + 1.0
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols + 2.6, height * nrows), squeeze=False, sharey=True)
    names = [r["short"] for r in rows]
    colours = _label_colours(names)
    for ax, lab in zip(axes.flat, labels):
        values = [r["dq_mean"] if lab == "all" else r["per_label"].get(lab) for r in rows]
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax.barh(range(len(rows)), shown, color=[colours[n] for n in names])
        for i, v in enumerate(values):
            ax.text(shown[i], i, f" {v:.2f}" if v is not None and math.isfinite(v) else " n/a", va="center", fontsize=8)
        n = result["n_structures"] if lab == "all" else result["label_counts"][lab]
        ax.set_title(f"{lab} ({n})")
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, max([*shown, 1e-9]) * 1.3)
        ax.set_xlabel("mean Dq" if result["metric"] == "dq" else "mean MSE")
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    _save(fig, path)


def plot_eta_curve(result: Mapping[str, Any], path: Path) -> None:
    """Draw ``eta_curve.png``: mean Dq against eta per checkpoint, the selection-chosen eta marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, ck in enumerate(result["checkpoints"]):
        colour = f"C{i}"
        curve = ck["eta_curve"]
        ax.plot([p["eta"] for p in curve], [p["dq"]["mean"] for p in curve], "o-", color=colour, label=ck["name"])
        sel, chosen = ck.get("selection_eta_curve"), ck.get("fixed_step_selected")
        if sel and chosen:
            ax.plot(
                [p["eta"] for p in sel],
                [p["dq"]["mean"] for p in sel],
                "x:",
                color=colour,
                label=f"{ck['name']} on {chosen['chosen_on']}",
            )
            ax.axvline(chosen["eta"], color=colour, ls="--", lw=1)
            ax.scatter([chosen["eta"]], [chosen["dq"]["mean"]], s=160, facecolors="none", edgecolors=colour, lw=2)
            ax.annotate(
                f"eta {chosen['eta']:.3g} (chosen on {chosen['chosen_on']})",
                (chosen["eta"], chosen["dq"]["mean"]),
                textcoords="offset points",
                xytext=(8, 10 + 14 * i),
                color=colour,
                fontsize=9,
            )
        own = ck.get("own_rule")
        if own and own.get("eta") is not None:
            ax.scatter([own["eta"]], [own["dq"]["mean"]], marker="*", s=160, color=colour, zorder=5)
    ax.axhline(result["do_nothing"]["dq"]["mean"], color="grey", ls="--", lw=1, label="do nothing")
    _log_axes(ax)
    ax.set_xlabel("fixed step size eta (Å$^2$/eV)")
    ax.set_ylabel(f"mean {'Dq' if result['metric'] == 'dq' else 'MSE'} on {result['split']}")
    ax.set_title("Fixed-step relaxation (star: the model's own rule)")
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


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


def plot_training(result: Mapping[str, Any], path: Path) -> None:
    """Draw ``training_curves.png`` from the checkpoints' histories."""
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
    _save(fig, path)


def write_plots(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Every plot into ``out``; returns role -> path."""
    paths = {role: out / name for role, name in PLOT_FILES.items()}
    plot_paired(result, paths["paired"])
    plot_per_label(result, paths["per_label"])
    plot_eta_curve(result, paths["eta_curve"])
    plot_training(result, paths["training"])
    return paths

"""Structure-by-structure comparisons of an evaluation: every ratio with its median and its win rate.

A ratio of two means can hide a typical loss (measured: a mean of 0.314x against
ASE FIRE while the tuned rule won only 38% of the structures, median
per-structure ratio 1.39). So :func:`ratio_stats` always gives three numbers:
the ratio of the means, the median of the per-structure ratios and the
fraction of structures improved. :func:`comparisons` applies it to each tuned
checkpoint (every checkpoint after the first, the pretrained one): its exported
relaxation and ASE FIRE against the pretrained model's best fixed step (eta
chosen on val) and its ASE FIRE, and against every baseline row.
:func:`worse_labels` finds the labels where a tuned model loses on the mean;
:func:`per_element` gives every method's mean per element.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ase_bptt.evaluation.rows import METHODS, method_rows

__all__ = ["ratio_stats", "comparisons", "worse_labels", "worse_label_lines", "per_element"]


def ratio_stats(values: Sequence[float | None], base: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean_ratio", "median_ratio", "improved", "n"}`` of ``values`` against ``base``, structure by structure
    (pairs where either is None or not finite are left out; a zero base counts as a ratio of inf unless the value
    is zero too)."""
    pairs = [
        (float(v), float(b))
        for v, b in zip(values, base)
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)
    ]
    if not pairs:
        return {"mean_ratio": None, "median_ratio": None, "improved": None, "n": 0}
    ratios = [v / b if b > 0 else (1.0 if v == 0 else math.inf) for v, b in pairs]
    total = sum(b for _, b in pairs)
    return {
        "mean_ratio": sum(v for v, _ in pairs) / total if total > 0 else None,
        "median_ratio": statistics.median(ratios),
        "improved": sum(v < b for v, b in pairs) / len(pairs),
        "n": len(pairs),
    }


def _fixed_key(ck: Mapping[str, Any]) -> str:
    return "fixed_step_selected" if ck.get("fixed_step_selected") else "fixed_step_perfect_information"


def comparisons(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each tuned checkpoint's exported relaxation and ASE FIRE against the pretrained model's best fixed step and
    ASE FIRE and against every baseline row, as :func:`ratio_stats` plus the labels a reader sees; with one
    checkpoint, its exported relaxation against its own best fixed step and ASE FIRE."""
    cks = result["checkpoints"]
    if not cks:
        return []
    pre = cks[0]
    tuned = cks[1:] or ([pre] if pre.get("own_rule") else [])
    against = [(pre["name"], key, pre.get(key)) for key in (_fixed_key(pre), "fire")]
    against += [(b["name"], "baseline", b) for b in result.get("baselines", [])]
    out = []
    for ck in tuned:
        for key in ("own_rule", "fire"):
            entry = ck.get(key)
            if not entry or ck is pre and key == "fire":
                continue
            for model, base_key, base in against:
                if not base or base is entry:
                    continue
                out.append(
                    {
                        "model": ck["name"],
                        "method": key,
                        "method_label": _label(key, entry),
                        "against_model": model,
                        "against": base_key,
                        "against_label": _label(base_key, base),
                        **ratio_stats(entry["per_structure"], base["per_structure"]),
                    }
                )
    return out


def _label(key: str, entry: Mapping[str, Any]) -> str:
    if key == "baseline":
        return "ASE FIRE"
    from ase_bptt.evaluation.rows import method_label

    return method_label(key, entry)


# ----------------------------------------------------------------- labels
def worse_labels(result: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``[{label, n, bptt, fixed, ratio, model, fixed_chosen_on}]`` for every (tuned checkpoint, label) whose
    exported relaxation's mean is above the pretrained model's best fixed step; None when there is no pair to
    compare (fewer than two checkpoints, or no tuned one with a stored relaxation).

    A mean over the whole split can hide a label the tuning made worse (measured: interstitials at 0.90-0.97x
    while vacancies went to 0.1x). ``evaluate`` stores the list in ``report.json["worse_labels"]``, report.md
    shows it and the CLI prints one warning line per entry.
    """
    cks = result["checkpoints"]
    if len(cks) < 2:
        return None
    pre = cks[0]
    fixed = pre.get(_fixed_key(pre))
    tuned = [ck for ck in cks[1:] if ck.get("own_rule")]
    if not fixed or not tuned:
        return None
    out = []
    for ck in tuned:
        for label, entry in sorted(ck["own_rule"]["dq"]["per_label"].items()):
            base = fixed["dq"]["per_label"].get(label)
            if base is None or not entry["mean"] > base["mean"]:
                continue
            out.append(
                {
                    "label": label,
                    "n": entry["n"],
                    "bptt": entry["mean"],
                    "fixed": base["mean"],
                    "ratio": entry["mean"] / base["mean"] if base["mean"] > 0 else float("inf"),
                    "model": ck["name"],
                    "fixed_chosen_on": fixed.get("chosen_on"),
                }
            )
    return out


def worse_label_lines(result: Mapping[str, Any]) -> list[str]:
    """One warning line per entry of ``result["worse_labels"]`` (for the terminal)."""
    what = "Dq" if result.get("metric", "dq") == "dq" else "MSE"
    return [
        f"warning: {w['model']} is worse than the pretrained model's best fixed step on label {w['label']!r} "
        f"({w['n']} structures): mean {what} {w['bptt']:.4g} vs {w['fixed']:.4g} ({w['ratio']:.2f}x)"
        for w in result.get("worse_labels") or []
    ]


def per_element(result: Mapping[str, Any]) -> dict[str, Any]:
    """Mean Dq of every method over the structures that contain each element (``report.json``'s ``per_element``).

    Returns:
        ``{"counts": {element: structures}, "methods": [{"method", "model",
        "dq": {element: mean}}]}`` with the methods of :func:`~ase_bptt.evaluation.rows.method_rows`;
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
    entries += [ck[key] for ck in result["checkpoints"] for key, _, _ in METHODS if ck.get(key)]
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

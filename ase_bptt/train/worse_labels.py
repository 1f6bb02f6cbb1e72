"""Labels (defect kinds) where a tuned model is worse than the pretrained model's best fixed step.

A mean over the whole split can hide a label the tuning made worse (measured:
interstitials at 0.90-0.97x while vacancies went to 0.1x). :func:`worse_labels`
compares, per label, the mean Dq (or MSE) of each tuned checkpoint's own step
rule with the pretrained checkpoint's fixed step at the eta chosen on the
selection split (val), the same pairing as the paired plot: the first
checkpoint is the pretrained one, every later one with a step rule a tuned one.
``evaluate`` stores the list in ``report.json["worse_labels"]``, report.md
shows it (:mod:`ase_bptt.train.report`) and the CLI prints one warning line
per entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["worse_labels", "worse_label_lines"]


def worse_labels(result: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``[{label, n, bptt, fixed, ratio, model, fixed_chosen_on}]`` for every (tuned checkpoint, label)
    whose own-rule mean is above the pretrained model's best fixed step; None when there is no
    pair to compare (fewer than two checkpoints, or no tuned one with a step rule)."""
    cks = result["checkpoints"]
    if len(cks) < 2:
        return None
    pre = cks[0]
    key = "fixed_step_selected" if pre.get("fixed_step_selected") else "fixed_step_perfect_information"
    fixed = pre.get(key)
    tuned = [ck for ck in cks[1:] if ck.get("own_rule")]
    if not fixed or not tuned:
        return None
    out = []
    for ck in tuned:
        own = ck["own_rule"]["dq"]["per_label"]
        for label, entry in sorted(own.items()):
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

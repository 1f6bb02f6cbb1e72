"""Train/val/test splits of relaxation trajectories: per trajectory, from a hash of its id.

Frames of one relaxation are near-duplicates, so a split is always given to a
whole trajectory; it depends on ``(seed, traj_id)`` only, so importing more
data never moves trajectories already stored.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from ase_bptt.errors import AseBpttError

__all__ = ["SPLITS", "SplitFractionError", "SplitFractions", "check_split_fractions", "split_of"]

SPLITS = ("train", "val", "test")


class SplitFractionError(AseBpttError, ValueError):
    """Validation and test fractions that leave nothing (or less than nothing) for training."""


@dataclass(frozen=True)
class SplitFractions:
    """How trajectories are split into train/val/test: expected fractions and the seed.

    Checked when made, so a command can check them before it writes anything.

    Raises:
        SplitFractionError: a fraction is negative, or ``val + test >= 1``.
    """

    val: float = 0.1
    test: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_split_fractions(self.val, self.test)

    def split_of(self, traj_id: str) -> str:
        """The split of ``traj_id`` (see :meth:`TrajectoryDB.assign_splits`)."""
        return split_of(traj_id, self.val, self.test, self.seed)


def check_split_fractions(val: float, test: float, *, train_left: bool = True) -> None:
    """Check fractions before anything is written.

    Args:
        val: expected fraction for validation.
        test: expected fraction for test.
        train_left: require ``val + test < 1``; with False ``val + test == 1``
            (e.g. a test-only database) is allowed too.

    Raises:
        SplitFractionError: a fraction is negative or not a number, or they add up to too much.
    """
    total = val + test
    if val >= 0 and test >= 0 and (total < 1 or (not train_left and total <= 1)):
        return
    bound = "< 1 (the rest is for training)" if train_left else "<= 1"
    raise SplitFractionError(
        f"val={val} and test={test}: each must be >= 0 and val + test {bound}; e.g. val=0.1 test=0.1"
    )


def split_of(traj_id: str, val: float, test: float, seed: int) -> str:
    """The split of one trajectory: a hash of ``(seed, traj_id)`` mapped to [0, 1) and cut at test, test + val."""
    digest = hashlib.sha256(f"{seed}\0{traj_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def split_changes(
    key_value_pairs: list[tuple[int, dict]], val: float, test: float, seed: int, *, reassign: bool
) -> list[tuple[int, str]]:
    """``[(row id, new split)]`` for the frame rows whose trajectory gets a (new) split.

    Args:
        key_value_pairs: ``(row id, key-value pairs)`` of every frame row.
        val, test, seed: as in :func:`split_of`.
        reassign: recompute trajectories that already have a split too.
    """
    rows_of: dict[str, list[int]] = defaultdict(list)
    current: dict[str, str | None] = {}
    for row_id, kvp in key_value_pairs:
        rows_of[kvp["traj_id"]].append(row_id)
        if kvp.get("is_final"):
            current[kvp["traj_id"]] = kvp.get("split")
    changes: list[tuple[int, str]] = []
    for traj_id, old in current.items():
        new = split_of(traj_id, val, test, seed)
        if (old is None or reassign) and new != old:
            changes.extend((row_id, new) for row_id in rows_of[traj_id])
    return changes


def split_table(trajectories: Counter, frames: Counter) -> list[str]:
    """Lines of a table of trajectory and frame counts per ``(split, label, converged)`` key."""
    header = ("split", "label", "converged", "trajectories", "frames")
    lines = [header]
    order = {s: i for i, s in enumerate(SPLITS)}
    for key in sorted(trajectories, key=lambda k: (order.get(k[0], 9), k[0], k[1], k[2])):
        lines.append((*key, str(trajectories[key]), str(frames[key])))
    lines.append(("total", "", "", str(sum(trajectories.values())), str(sum(frames.values()))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for j, line in enumerate(lines):
        text.append(
            "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        )
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return text

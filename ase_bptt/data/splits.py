"""Train/val/test splits of relaxation trajectories: per trajectory, from a hash of its id.

Frames of one relaxation are near-duplicates, so a split is always given to a
whole trajectory; it depends on ``(seed, traj_id)`` only, so importing more
data never moves trajectories already stored.

A :class:`HoldOut` sends whole groups to test instead (trajectories with given
labels, or containing given elements), so test measures generalisation to
defect kinds or elements that training never saw; the others are split by the
hash as before.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ase.data import chemical_symbols

from ase_bptt.errors import AseBpttError

__all__ = [
    "SPLITS",
    "HoldOut",
    "HoldOutError",
    "SplitFractionError",
    "SplitFractions",
    "as_hold_outs",
    "check_split_fractions",
    "hold_out_in_force",
    "merge_hold_outs",
    "recorded_hold_out",
    "split_of",
    "target_splits",
]

SPLITS = ("train", "val", "test")
HOLD_OUT_KINDS = ("label", "element")
#: ``(label, current split, elements)`` of one trajectory, by traj_id.
TrajectoryInfo = tuple[str | None, str | None, frozenset[str]]


class SplitFractionError(AseBpttError, ValueError):
    """Validation and test fractions that leave nothing (or less than nothing) for training."""


class HoldOutError(AseBpttError, ValueError):
    """A hold-out that cannot be kept: an unknown element or kind, a value no trajectory
    matches, nothing left for training, or a held-out trajectory that keeps a train/val split."""


@dataclass(frozen=True)
class HoldOut:
    """A group of trajectories that goes to the test split as a whole.

    Attributes:
        kind: ``"label"``: trajectories whose label matches one of ``values``;
            ``"element"``: trajectories whose structure contains one of the
            elements in ``values`` (chemical symbols, case matters). Such an
            element then never occurs in train or val (checked).
        values: labels or chemical symbols. A label value is a shell-style
            pattern matched against the whole label (:func:`fnmatch.fnmatchcase`):
            without ``*``, ``?`` or ``[`` it is the exact label (``sub:Ni`` is
            only ``sub:Ni``, not ``sub:Ni+vacancy``); ``sub:Ni*`` is a prefix match
            (``sub:Ni``, ``sub:Ni+vacancy``, ``sub:Ni+sub:Pd``); ``int:*`` every
            interstitial of ``fcc-defects``.

    Raises:
        HoldOutError: unknown kind, no values, or an unknown chemical symbol.
    """

    kind: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in HOLD_OUT_KINDS:
            raise HoldOutError(f"hold-out kind {self.kind!r}: choose from {HOLD_OUT_KINDS}")
        values = (self.values,) if isinstance(self.values, str) else tuple(self.values)
        object.__setattr__(self, "values", values)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise HoldOutError(f"hold-out by {self.kind}: give one or more non-empty strings, not {self.values!r}")
        unknown = [v for v in values if self.kind == "element" and v not in chemical_symbols[1:]]
        if unknown:
            raise HoldOutError(
                f"hold-out element {', '.join(map(repr, unknown))} is not a chemical symbol (e.g. Ni, Pd, Au; case matters)"
            )

    def matches(self, label: str | None, elements: Iterable[str]) -> bool:
        """Whether a trajectory with this label and these elements is held out."""
        return self.matching(label, elements) != ()

    def matching(self, label: str | None, elements: Iterable[str]) -> tuple[str, ...]:
        """The values that match a trajectory with this label and these elements."""
        if self.kind == "label":
            return tuple(v for v in self.values if label is not None and fnmatchcase(label, v))
        present = set(elements)
        return tuple(v for v in self.values if v in present)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> HoldOut:
        """The inverse of :meth:`to_dict` (a hold-out as the metadata records it)."""
        return cls(record["kind"], tuple(record["values"]))

    def __str__(self) -> str:
        return f"{self.kind} {', '.join(self.values)}"


def as_hold_outs(hold_out: HoldOut | Sequence[HoldOut] | None) -> tuple[HoldOut, ...]:
    """One hold-out, several or none, as a tuple."""
    return (hold_out,) if isinstance(hold_out, HoldOut) else tuple(hold_out or ())


def merge_hold_outs(*groups: Sequence[HoldOut]) -> tuple[HoldOut, ...]:
    """The union of hold-outs (each once, in order): a database's recorded one and a command's."""
    out: list[HoldOut] = []
    for group in groups:
        out.extend(h for h in group if h not in out)
    return tuple(out)


def recorded_hold_out(metadata: Mapping[str, Any]) -> tuple[HoldOut, ...]:
    """The hold-out a database's last split recorded (metadata entry ``splits``; empty when none)."""
    recorded = (metadata.get("splits") or {}).get("hold_out") or []
    return tuple(HoldOut.from_dict(h) for h in recorded)


def hold_out_in_force(
    metadata: Mapping[str, Any], hold_out: HoldOut | Sequence[HoldOut] | None, *, reassign: bool
) -> tuple[HoldOut, ...]:
    """The hold-out a split of a database applies: ``hold_out`` joined by the recorded one, which stays in
    force until ``reassign`` (then ``hold_out`` alone)."""
    given = as_hold_outs(hold_out)
    return given if reassign else merge_hold_outs(recorded_hold_out(metadata), given)


def held_out(info: Mapping[str, TrajectoryInfo], hold_out: Sequence[HoldOut]) -> set[str]:
    """The traj_ids a hold-out sends to test.

    Raises:
        HoldOutError: a value matches no trajectory, or every trajectory is held out.
    """
    held: set[str] = set()
    used: set[tuple[str, str]] = set()
    for traj_id, (label, _, elements) in info.items():
        for h in hold_out:
            found = h.matching(label, elements)
            used.update((h.kind, v) for v in found)
            if found:
                held.add(traj_id)
    for h in hold_out:
        for v in h.values:
            if (h.kind, v) not in used:
                raise HoldOutError(f"hold-out {h.kind} {v!r} matches no trajectory; {_present(info, h.kind)}")
    if info and held == set(info):
        names = "; ".join(map(str, hold_out))
        raise HoldOutError(f"hold-out {names} takes all {len(info)} trajectories; none is left for training")
    return held


def _present(info: Mapping[str, TrajectoryInfo], kind: str) -> str:
    if kind == "label":
        found = sorted({label for label, _, _ in info.values() if label is not None})
    else:
        found = sorted({e for _, _, elements in info.values() for e in elements})
    if not found:
        return f"the trajectories have no {kind}s"
    more = f" and {len(found) - 12} more" if len(found) > 12 else ""
    return f"{kind}s present: {', '.join(found[:12])}{more}"


def target_splits(
    info: Mapping[str, TrajectoryInfo],
    val: float,
    test: float,
    seed: int,
    *,
    reassign: bool,
    hold_out: Sequence[HoldOut] = (),
    declared: Collection[str] = (),
) -> dict[str, str]:
    """The split of every trajectory after :meth:`TrajectoryDB.assign_splits`.

    Held-out trajectories get "test", the others :func:`split_of`; a
    trajectory that has a split keeps it unless ``reassign``, and one whose
    split the user declared (``declared``: traj_ids) keeps it even then.

    Raises:
        HoldOutError: see :func:`held_out`; or a held-out trajectory would
            keep a train/val split (assigned before, without this hold-out,
            or declared).
    """
    held = held_out(info, hold_out) if hold_out else set()
    out: dict[str, str] = {}
    for traj_id, (_, old, _) in info.items():
        new = "test" if traj_id in held else split_of(traj_id, val, test, seed)
        out[traj_id] = old if old is not None and (not reassign or traj_id in declared) else new
    # The guarantee, checked on the result: nothing a hold-out names is in train or val.
    leaks = sorted(
        t for t, (label, _, el) in info.items() if out[t] != "test" and any(h.matches(label, el) for h in hold_out)
    )
    named = [t for t in leaks if t in declared]
    if named:
        raise HoldOutError(
            f"{len(named)} held-out trajectories (e.g. {named[0]}) were declared {out[named[0]]} "
            f"(--split {out[named[0]]}); declare them test (ase-bptt split DB --split test --traj-id "
            f"{named[0]}) or hold out something else"
        )
    if leaks:
        raise HoldOutError(
            f"{len(leaks)} held-out trajectories (e.g. {leaks[0]}) already have a train or val split; "
            "reassign every split (assign_splits(..., reassign=True), ase-bptt split DB --reassign ...)"
        )
    return out


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
    hold_out: tuple[HoldOut, ...] = ()

    def __post_init__(self) -> None:
        check_split_fractions(self.val, self.test)
        object.__setattr__(self, "hold_out", as_hold_outs(self.hold_out))

    def split_of(self, traj_id: str, label: str | None = None, elements: Iterable[str] = ()) -> str:
        """The split of ``traj_id`` (see :meth:`TrajectoryDB.assign_splits`)."""
        if any(h.matches(label, elements) for h in self.hold_out):
            return "test"
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


def split_changes(key_value_pairs: list[tuple[int, dict]], target: Mapping[str, str]) -> list[tuple[int, str]]:
    """``[(row id, new split)]`` for the frame rows whose trajectory's split changes.

    Args:
        key_value_pairs: ``(row id, key-value pairs)`` of every frame row.
        target: the split of each trajectory afterwards (:func:`target_splits`).
    """
    return [
        (row_id, target[kvp["traj_id"]])
        for row_id, kvp in key_value_pairs
        if kvp["traj_id"] in target and kvp.get("split") != target[kvp["traj_id"]]
    ]


def settings_lines(settings: Mapping | None) -> list[str]:
    """The metadata entry ``splits`` as a line of :meth:`TrajectoryDB.summary` (none before any assignment)."""
    if not settings:
        return []
    line = f"splits: val={settings['val']:g}, test={settings['test']:g}, seed={settings['seed']}"
    held = [str(HoldOut.from_dict(h)) for h in settings.get("hold_out") or []]
    return [line + (f"; held out in test: {'; '.join(held)}" if held else "")]


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

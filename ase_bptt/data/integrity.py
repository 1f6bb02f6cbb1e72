"""Whether a trajectory database keeps its promises (``ase-bptt check DB``).

A sound database holds whole trajectories: frames ``0 .. n_frames-1`` of
each, every one once, the last (and only the last) marked final, all with
one split, and no trajectory stored twice (same content hash). A write cut
off before ase-bptt made imports one transaction, or a database edited by
hand, can break these; :func:`integrity_problems` names each break and what
to do. It reads the rows' key-value pairs only (one query), never writes.
"""

from __future__ import annotations

from collections import Counter, defaultdict

__all__ = ["integrity_problems"]


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (at most 5 ranges shown)."""
    parts: list[list[int]] = []
    for v in sorted(values):
        if parts and parts[-1][1] == v - 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    text = [f"{a}-{b}" if b > a else f"{a}" for a, b in parts[:5]]
    return ", ".join(text) + (", ..." if len(parts) > 5 else "")


def _trajectory_problems(traj_id: str, rows: list[dict], name: str) -> list[str]:
    fix = f"remove it (ase db {name} traj_id={traj_id} --delete) and import or generate it again"
    n_values = sorted({r.get("n_frames") for r in rows}, key=str)
    if len(n_values) != 1 or not isinstance(n_values[0], int):
        return [f"{traj_id}: its rows disagree on n_frames ({n_values}); {fix}"]
    n = n_values[0]
    out = []
    frames = Counter(r.get("frame") for r in rows)
    twice = [f for f, c in frames.items() if c > 1 and isinstance(f, int)]
    if twice:
        out.append(f"{traj_id}: frame(s) {_ranges(twice)} stored more than once; {fix}")
    missing = sorted(set(range(n)) - set(frames))
    if missing:
        out.append(
            f"{traj_id}: holds {len(set(frames) & set(range(n)))} of its {n} frames (missing {_ranges(missing)}; "
            f"a write was cut off); {fix}"
        )
    finals = [r.get("frame") for r in rows if r.get("is_final")]
    if finals != [n - 1]:
        what = "no final frame" if not finals else f"final frame(s) {finals} instead of frame {n - 1} alone"
        out.append(f"{traj_id}: {what}; {fix}")
    splits = {r.get("split") for r in rows}
    if len(splits) > 1:
        out.append(f"{traj_id}: its frames have different splits ({sorted(map(str, splits))}); {fix}")
    elif splits == {None}:
        out.append(f"{traj_id}: has no split; assign one (ase-bptt split {name})")
    return out


def integrity_problems(rows: list[tuple[int, dict]], name: str = "DB") -> list[str]:
    """One line per break of the database's promises (empty when it keeps them).

    Args:
        rows: ``(row id, key-value pairs)`` of every row.
        name: the database's name in the advice.
    """
    by_traj: dict[str, list[dict]] = defaultdict(list)
    foreign = 0
    for _, kvp in rows:
        if "traj_id" in kvp:
            by_traj[kvp["traj_id"]].append(kvp)
        else:
            foreign += 1
    out = [f"{foreign} row(s) are no trajectory frame (no traj_id key)"] if foreign else []
    holders: dict[str, list[str]] = defaultdict(list)
    for traj_id in sorted(by_traj):
        out += _trajectory_problems(traj_id, by_traj[traj_id], name)
        digests = {r.get("content_hash") for r in by_traj[traj_id]} - {None}
        for digest in digests:
            holders[str(digest)].append(traj_id)
    for traj_ids in holders.values():
        if len(traj_ids) > 1:
            out.append(
                f"{', '.join(traj_ids)} are one trajectory stored {len(traj_ids)} times (same content hash); "
                f"remove all but one (ase db {name} traj_id=ID --delete)"
            )
    return out

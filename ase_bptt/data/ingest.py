"""Import relaxation trajectories from files into a TrajectoryDB.

Every file is one relaxation, except MPtrj JSON files, which hold many.
Formats:

- anything ``ase.io.read(path, index=":")`` reads with forces: ASE ``.traj``,
  extended XYZ, VASP ``vasprun.xml`` and ``OUTCAR`` (also ``.gz``/``.bz2``/
  ``.xz``), and the other ASE formats that carry forces;
- the MPtrj JSON layout used by CHGNet (also ``.json.gz``)::

      {mp_id: {frame_id: {"structure": <pymatgen Structure dict>,
                          "uncorrected_total_energy": float,   # or
                          "corrected_total_energy" / "energy",
                          "force": [[fx, fy, fz], ...], ...}}}

  One trajectory per ``mp_id`` (its traj_id). Frame ids look like
  ``"mp-1234-0-5"``: task ``mp-1234``, calculation 0, ionic step 5; frames
  are ordered by (task, calculation, ionic step), compared numerically. The
  energy is taken from the first of ``uncorrected_total_energy``,
  ``corrected_total_energy``, ``energy`` that is present (uncorrected first:
  it is the energy whose gradient the forces are).
- an ``ase.db`` database (``.db``): one trajectory per value of the key
  named by ``group_key`` (rows in id order); a database made by ase-bptt is
  grouped by its ``traj_id`` (rows in frame order). A database from another
  program without ``group_key`` is skipped with advice: its rows may be
  several relaxations.

A trajectory's label is ``label`` when given, else the ``label_key`` entry
(default ``"label"``) of its first frame's ``atoms.info`` (extxyz and
``.traj`` keep it), else none.

Everything is read and validated before anything is written, and all writes
of one call (the trajectories and their splits) happen in one transaction: a
failure part-way leaves the database as it was. Files that cannot be used are reported with the reason, never
written.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.data.db import InvalidTrajectoryError, TrajectoryDB, content_hash, validate_frames
from ase_bptt.data.duplicates import Shape, StoredRelaxations, same_relaxation, shape_of
from ase_bptt.data.splits import SPLITS, SplitFractions

__all__ = ["ImportReport", "import_paths", "read_trajectory", "read_mptrj"]


@dataclass
class ImportReport:
    """What one import call did.

    Attributes:
        added: traj_ids written, in order.
        skipped: ``(path, reason)`` for every file (or MPtrj entry, as
            ``"file.json:mp-123"``) that was not written.
    """

    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"added {len(self.added)} trajectories, skipped {len(self.skipped)}"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


class _Skip(Exception):
    """A file (or entry) cannot be imported; the message is the reason."""


#: ``(where, traj_id or None, frames or the reason to skip them)`` for one trajectory read from a file.
_Entry = tuple[str, str | None, "list[Atoms] | _Skip"]


@dataclass
class _Candidate:
    where: str
    frames: list[Atoms]
    digest: str
    traj_id: str | None


# ------------------------------------------------------------------ helpers
def _open_text(path: Path) -> Any:
    opener: Any = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rt", errors="replace")


def _base_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _check_vasprun_complete(path: Path) -> None:
    # ASE silently returns the complete frames of a truncated vasprun.xml,
    # so the file's structure is checked here.
    with _open_text(path) as fh:
        text = fh.read()
    n_calc = len(re.findall(r"<calculation>", text))
    n_forces = len(re.findall(r'<varray\s+name="forces"', text))
    if "</modeling>" not in text:
        raise _Skip(
            f"truncated vasprun.xml (no closing </modeling>; {n_calc} <calculation> "
            f"blocks, {n_forces} with forces): the run was cut off, rerun or remove it"
        )
    if n_forces < n_calc:
        raise _Skip(f"truncated vasprun.xml: {n_calc} <calculation> blocks but only {n_forces} with forces")


def _with_single_point(atoms: Atoms, i: int) -> Atoms:
    calc = atoms.calc
    results = {} if calc is None else dict(getattr(calc, "results", {}) or {})
    forces = results.get("forces")
    if forces is None:
        raise _Skip(f"frame {i} has no forces (a structure-only or unfinished file?)")
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=results.get("energy"), forces=np.asarray(forces))
    return out


def read_trajectory(path: str | os.PathLike) -> list[Atoms]:
    """Read one relaxation with ASE and check that the file is complete.

    Args:
        path: any file ``ase.io.read(path, index=":")`` reads.

    Returns:
        Frames with ``SinglePointCalculator`` s (forces, energy when known).

    Raises:
        InvalidTrajectoryError: unknown format, unreadable or truncated file,
            missing forces; the message names the file.
    """
    try:
        entries = _read_ase(Path(path))
        if len(entries) != 1:
            raise _Skip(f"holds {len(entries)} trajectories; import it with import_paths")
        frames = entries[0][2]
        if isinstance(frames, _Skip):
            raise frames
        return frames
    except _Skip as exc:
        raise InvalidTrajectoryError(f"{path}: {exc}") from None


def _read_ase(path: Path, group_key: str | None = None) -> list[_Entry]:
    """``[(where, traj_id or None, frames or the reason to skip)]`` from a file ASE reads."""
    from ase.io import read
    from ase.io.formats import UnknownFileTypeError, filetype

    if path.stat().st_size == 0:
        raise _Skip("empty file")
    try:
        fmt = filetype(str(path))
    except UnknownFileTypeError:
        fmt = None
    except Exception as exc:  # unreadable: the reason is in the exception
        raise _Skip(f"cannot detect its format ({type(exc).__name__}: {exc})") from None
    unknown = _Skip(
        "unknown format: ASE cannot detect it and it is no MPtrj JSON "
        "(use an ASE-readable format such as .traj or extxyz)"
    )
    if fmt is None:
        raise unknown
    if fmt == "db":
        return _read_ase_db(path, group_key)
    if fmt == "vasp-xml":
        _check_vasprun_complete(path)
    try:
        frames = read(str(path), index=":", format=fmt)
    except UnknownFileTypeError:
        raise unknown from None
    except Exception as exc:  # ASE raises anything (IndexError on a broken OUTCAR)
        raise _Skip(f"ASE cannot read it as {fmt} ({type(exc).__name__}: {exc})") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise _Skip(f"ASE reads no frames from it as {fmt} (unfinished or broken file?)")
    return [(str(path), None, [_with_single_point(a, i) for i, a in enumerate(frames)])]


def _read_ase_db(path: Path, group_key: str | None) -> list[_Entry]:
    # An ase.db holds rows, not relaxations: without a key that tells the
    # relaxations apart they would be merged into one trajectory.
    import sqlite3

    import ase.db

    try:  # read-only, so a foreign SQLite file is never changed by ase's table set-up
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            con.execute("SELECT id, key_value_pairs FROM systems LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise _Skip(f"not an ase.db database (SQLite: {exc})") from None
    db = ase.db.connect(str(path), type="db", use_lock_file=False)
    ours = "ase_bptt_schema" in db.metadata
    key = group_key or ("traj_id" if ours else None)
    rows = list(db.select())
    if key is None:
        keys = sorted({k for row in rows for k in row.key_value_pairs})
        raise _Skip(
            f"an ase.db database with {len(rows)} rows from another program: its rows may be several relaxations; "
            f"name the key that tells them apart with --group-key KEY (its keys: {', '.join(keys) or 'none'}), "
            "or write each relaxation to its own .traj file"
        )
    groups: dict[str, list] = {}
    missing = 0
    for row in rows:
        value = row.get(key)
        if value is None:
            missing += 1
        else:
            groups.setdefault(str(value), []).append(row)
    out: list[_Entry] = []
    if missing:
        out.append((str(path), None, _Skip(f"{missing} of its {len(rows)} rows have no key {key!r}")))
    stem = _base_name(path).rsplit(".", 1)[0]
    for value, group in groups.items():
        group.sort(key=lambda row: row.get("frame", 0) if ours else row.id)
        frames: list[Atoms] | _Skip = []
        try:  # one group's bad frame skips that group, named as such, not the whole file
            frames = [_with_single_point(_atoms_of(row), i) for i, row in enumerate(group)]
        except _Skip as exc:
            frames = exc
        out.append((f"{path}:{key}={value}", value if ours else f"{stem}-{value}", frames))
    return out


def _atoms_of(row) -> Atoms:
    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    return atoms


# -------------------------------------------------------------------- MPtrj
def _natural_key(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _mptrj_frame_key(frame_id: str) -> tuple:
    task, sep, rest = frame_id.rpartition("-")
    task2, sep2, calc = task.rpartition("-")
    if not (sep and sep2 and rest.isdigit() and calc.isdigit()):
        raise _Skip(
            f"frame id {frame_id!r} is not of the form <task>-<calculation>-<ionic step> "
            "(e.g. mp-1234-0-5), so the frame order is unknown"
        )
    return (_natural_key(task2), int(calc), int(rest))


def _is_mptrj(data) -> bool:
    if not isinstance(data, dict) or not data:
        return False
    first = next(iter(data.values()))
    if not isinstance(first, dict) or not first:
        return False
    frame = next(iter(first.values()))
    return isinstance(frame, dict) and "structure" in frame


def _mptrj_frames(frames_by_id: dict) -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if not isinstance(frames_by_id, dict):
        raise _Skip("entry is not a {frame_id: frame} mapping")
    ordered = sorted(frames_by_id.items(), key=lambda kv: _mptrj_frame_key(kv[0]))
    out: list[Atoms] = []
    for frame_id, frame in ordered:
        try:
            structure = Structure.from_dict(frame["structure"])
            atoms = AseAtomsAdaptor.get_atoms(structure)
        except Exception as exc:
            raise _Skip(f"frame {frame_id}: bad structure ({type(exc).__name__}: {exc})") from None
        # The adaptor attaches its own calculator when site properties hold forces; drop it.
        atoms.calc = None
        energy = None
        for key in ("uncorrected_total_energy", "corrected_total_energy", "energy"):
            if frame.get(key) is not None:
                energy = float(frame[key])
                break
        forces = frame.get("force", frame.get("forces"))
        if forces is None:
            raise _Skip(f"frame {frame_id} has no 'force'")
        try:
            forces = np.asarray(forces, dtype=float)
        except (TypeError, ValueError):
            raise _Skip(f"frame {frame_id}: 'force' is not a numeric array") from None
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        out.append(atoms)
    return out


def read_mptrj(path: str | os.PathLike) -> dict[str, list[Atoms]]:
    """Read an MPtrj JSON file into ``{mp_id: frames}`` (unvalidated)."""
    path = Path(path)
    with _open_text(path) as fh:
        data = json.load(fh)
    if not _is_mptrj(data):
        raise InvalidTrajectoryError(f"{path}: not in the MPtrj layout")
    return {mp_id: _mptrj_frames(frames) for mp_id, frames in data.items()}


def _load_json(path: Path):
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except (ValueError, OSError, EOFError):
        return None


# --------------------------------------------------------------------- walk
def _walk(paths: Iterable[str | os.PathLike], recursive: bool, skipped: list) -> list[Path]:
    files = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.glob("*")
            files.extend(sorted(f for f in found if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append((str(p), "no such file or directory"))
    return files


def import_paths(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    db: TrajectoryDB,
    *,
    label: str | None = None,
    label_key: str = "label",
    source: str | None = None,
    recursive: bool = True,
    splits: SplitFractions | None = None,
    split: str | None = None,
    group_key: str | None = None,
) -> ImportReport:
    """Import files and directories of relaxations into ``db``.

    Every file is read and validated first (see the module docstring for the
    formats and :func:`ase_bptt.data.db.validate_frames` for the rules);
    then all good trajectories are written in one transaction, which holds
    the database's write lock from the duplicate check to the commit.

    Args:
        paths: files and/or directories (walked).
        db: the target database.
        label: label given to every imported trajectory; None: each
            trajectory's ``atoms.info[label_key]`` when its first frame has one.
        label_key: the ``atoms.info`` key read when ``label`` is None.
        source: source recorded for every trajectory; default the file path.
        recursive: walk directories recursively.
        splits: give every trajectory in the database a split (see
            :meth:`TrajectoryDB.assign_splits`), in the same transaction as
            the new trajectories; None leaves splits alone. A hold-out that
            cannot be kept (:class:`~ase_bptt.data.splits.HoldOutError`) is
            found before anything is written.
        split: declare the split ("train", "val" or "test") of every
            trajectory this call adds, e.g. a fixed test set (see
            :meth:`TrajectoryDB.declare_split`); checked against the
            hold-out in force before anything is written.
        group_key: the key whose value tells the relaxations in an ``ase.db``
            file apart (one trajectory per value).

    Returns:
        An :class:`ImportReport` with the traj_ids added and every
        ``(path, reason)`` skipped. A trajectory that is the same relaxation
        as one stored (or another one of this call) within
        :data:`~ase_bptt.data.duplicates.POSITION_TOL` is skipped, naming the
        copy kept: importing the same data twice adds nothing, and neither
        does an import of what another writer added meanwhile. When nothing
        is added nothing is written.

    Raises:
        DatabaseAccessError: the database cannot be written (checked first).
        HoldOutError: the hold-out (given or recorded) cannot be kept, or
            names a trajectory declared train/val; nothing is written.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    db.check_writable()
    report = ImportReport()
    candidates = _unique(_read_candidates(paths, db, recursive, group_key, report.skipped), report.skipped)
    if not candidates:
        return report
    with db.transaction():  # the write lock: what another writer added meanwhile is seen (and skipped) here
        stored = StoredRelaxations(db)
        taken = db.traj_ids()
        to_write = []
        for c in candidates:
            found = stored.find(c.frames)
            if found is not None:
                origin = f" (from {found['source']})" if found.get("source") else ""
                report.skipped.append((c.where, f"already in the database as {found['traj_id']}{origin}"))
                continue
            traj_id = c.traj_id or f"{c.frames[0].get_chemical_formula()}-{c.digest[:12]}"
            if traj_id in taken:
                traj_id = f"{traj_id}-{c.digest[:8]}"
            taken.add(traj_id)
            to_write.append((c, traj_id, _label_of(c.frames, label, label_key)))
        if not to_write:
            return report
        new = {traj_id: (lab, split, frozenset(c.frames[0].get_chemical_symbols())) for c, traj_id, lab in to_write}
        db.check_new_splits(new, splits, declared=split is not None)
        for c, traj_id, lab in to_write:
            src = source if source is not None else c.where
            db.add_trajectory(c.frames, traj_id=traj_id, label=lab, source=src, split=split, declared=split is not None)
        if splits is not None:
            db.assign_splits(val=splits.val, test=splits.test, seed=splits.seed, hold_out=splits.hold_out)
    report.added.extend(traj_id for _, traj_id, _ in to_write)
    return report


def _read_candidates(
    paths: Sequence[str | os.PathLike], db: TrajectoryDB, recursive: bool, group_key: str | None, skipped: list
) -> list[_Candidate]:
    """Every valid trajectory in ``paths``; the others go to ``skipped`` with the reason."""
    candidates = []
    target = Path(db.name).resolve() if "://" not in db.name else None
    for path in _walk(paths, recursive, skipped):
        where = str(path)
        if target is not None and path.resolve() in (target, Path(f"{target}-journal")):
            skipped.append((where, "the target database itself"))
            continue
        try:
            entries = _read_file(path, group_key)
        except _Skip as exc:
            skipped.append((where, str(exc)))
            continue
        for entry_where, traj_id, frames in entries:
            if isinstance(frames, _Skip):
                skipped.append((entry_where, str(frames)))
                continue
            try:
                validate_frames(frames)
            except InvalidTrajectoryError as exc:
                skipped.append((entry_where, str(exc)))
                continue
            candidates.append(_Candidate(entry_where, frames, content_hash(frames), traj_id))
    return candidates


def _unique(candidates: list[_Candidate], skipped: list) -> list[_Candidate]:
    """``candidates`` without the later copies of one relaxation (each reported with the file kept)."""
    kept: list[_Candidate] = []
    by_shape: dict[Shape, list[_Candidate]] = {}  # only trajectories of one shape can be copies
    for c in candidates:
        group = by_shape.setdefault(shape_of(len(c.frames), c.frames[0].numbers, c.frames[0].pbc), [])
        first = next((k for k in group if same_relaxation(k.frames, c.frames)), None)
        if first is not None:
            skipped.append((c.where, f"same relaxation as {first.where} in this import (that one is kept)"))
        else:
            kept.append(c)
            group.append(c)
    return kept


def _label_of(frames: list[Atoms], label: str | None, label_key: str) -> str | None:
    if label is not None:
        return label
    value = frames[0].info.get(label_key)
    return None if value is None else str(value)


def _read_file(path: Path, group_key: str | None) -> list[_Entry]:
    """``[(where, traj_id or None, frames or the reason to skip)]`` for one file."""
    if path.stat().st_size == 0:
        raise _Skip("empty file")
    if _base_name(path).lower().endswith(".json"):
        data = _load_json(path)
        if data is not None and _is_mptrj(data):
            out: list[_Entry] = []
            for mp_id, frames_by_id in data.items():
                where = f"{path}:{mp_id}"
                try:
                    out.append((where, str(mp_id), _mptrj_frames(frames_by_id)))
                except _Skip as exc:
                    out.append((where, str(mp_id), exc))
            return out
    return _read_ase(path, group_key)

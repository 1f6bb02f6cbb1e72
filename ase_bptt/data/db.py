"""TrajectoryDB: relaxation trajectories stored in an ``ase.db`` database.

One row per frame; the row's atoms carry a ``SinglePointCalculator`` with the
frame's forces (and energy when known). The key-value pairs and metadata
(schema 1) are described once, in ``docs/data.md`` ("Database layout").
Writes happen in one transaction per call; :meth:`TrajectoryDB.transaction`
groups several calls into one.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.data.db_splits import SplitsMixin
from ase_bptt.data.db_store import frame_row, is_backend_error, open_store
from ase_bptt.data.db_types import (
    DatabaseAccessError,
    DatabasePathError,
    DuplicateTrajectoryError,
    NotATrajectoryDBError,
    Trajectory,
    TrajectoryDBError,
)
from ase_bptt.data.integrity import integrity_problems
from ase_bptt.data.splits import (
    SPLITS,
    HoldOut,
    HoldOutError,
    SplitFractionError,
    SplitFractions,
    settings_lines,
    split_table,
)
from ase_bptt.data.validate import (
    InvalidTrajectoryError,
    _frame_energy,
    _frame_forces,
    _movable_fmax,
    content_hash,
    validate_frames,
)

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "Trajectory",
    "TrajectoryDB",
    "TrajectoryDBError",
    "NotATrajectoryDBError",
    "InvalidTrajectoryError",
    "DuplicateTrajectoryError",
    "DatabaseAccessError",
    "DatabasePathError",
    "SplitFractionError",
    "SplitFractions",
    "HoldOut",
    "HoldOutError",
    # re-exported from ase_bptt.data.validate
    "validate_frames",
    "content_hash",
]

SCHEMA_VERSION = 1
_SCHEMA_KEY = "ase_bptt_schema"


#: The ``read_records`` meta entries a :class:`Trajectory` keeps.
_TRAJECTORY_META = ("traj_id", "label", "source", "split", "converged")


# ----------------------------------------------------------------- database
class TrajectoryDB(SplitsMixin):
    """Relaxation trajectories in an ``ase.db`` database.

    Args:
        url_or_path: a file path (SQLite, ``.db``) or any ``ase.db.connect``
            URL, e.g. ``postgresql://user:pw@host/name`` (needs
            ``ase-db-backends``).
        create: create the database (and write its metadata) when it does not
            exist yet. With False a missing database is an error.
        converged_fmax: max force (eV/A) below which a trajectory's last frame
            counts as relaxed. Recorded in a new database's metadata; for an
            existing database the recorded value is used and a different
            explicit value is an error. None: the recorded value or 0.05.
        read_only: never write, not even the indices ase-bptt adds or a new
            database's metadata (``ase-bptt check``); implies ``create=False``.

    Raises:
        FileNotFoundError: ``create=False`` and the file does not exist.
        NotATrajectoryDBError: the database was made by another program or by
            a newer ase-bptt.
        DatabaseAccessError: the database cannot be created, read or is
            locked; the message says what to do.
        DatabasePathError: the path names a JSON file.
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike,
        *,
        create: bool = True,
        converged_fmax: float | None = None,
        read_only: bool = False,
    ) -> None:
        self.name = os.fspath(url_or_path)
        is_url = "://" in self.name
        new = not is_url and not Path(self.name).exists()
        if new and (read_only or not create):
            raise FileNotFoundError(
                f"{self.name}: no such trajectory database; create one with `ase-bptt import` or `ase-bptt generate`"
            )
        if not is_url and self.name.endswith(".json"):
            # ase's JSON backend rewrites the whole file per write and has no
            # transactions, so imports could not be all-or-nothing.
            raise DatabasePathError(
                f"{self.name}: a trajectory database is an SQLite file or a database URL, not a JSON file; "
                f"name it e.g. {Path(self.name).with_suffix('.db').name}"
            )
        try:
            self._store = open_store(self.name)
        except Exception as exc:
            if not is_backend_error(exc):  # a bug shows its traceback
                raise
            raise DatabaseAccessError(
                f"{self.name}: ase.db cannot connect ({type(exc).__name__}: {exc}); for PostgreSQL install "
                "ase-bptt[postgres]"
            ) from exc
        self._depth = 0
        with self._access_errors(new=new):
            metadata = self._read_metadata()
            if not read_only:
                self._store.prepare()
            if _SCHEMA_KEY not in metadata:
                metadata = dict(metadata)
                metadata.update(
                    {
                        _SCHEMA_KEY: SCHEMA_VERSION,
                        "converged_fmax": 0.05 if converged_fmax is None else float(converged_fmax),
                    }
                )
                if not read_only:
                    self._db.metadata = metadata
        recorded = float(metadata["converged_fmax"])
        if converged_fmax is not None and not np.isclose(recorded, converged_fmax):
            raise ValueError(
                f"{self.name} records converged_fmax={recorded} eV/A; open it without "
                f"converged_fmax (or with {recorded}), or import into a new database"
            )
        self.converged_fmax = recorded

    def _read_metadata(self) -> dict:
        try:
            metadata = self._db.metadata
            n_rows = self._db.count()
        except Exception as exc:  # sqlite3.DatabaseError and friends: not a database at all
            if not is_backend_error(exc) or self._store.access_problem(exc, new=False) is not None:
                raise
            raise NotATrajectoryDBError(
                f"{self.name} is not an ase.db database ({type(exc).__name__}: {exc}); "
                "import its trajectories into a new database with `ase-bptt import`"
            ) from exc
        if _SCHEMA_KEY not in metadata and n_rows:
            raise NotATrajectoryDBError(
                f"{self.name} holds {n_rows} rows but was made by another program "
                f"(no '{_SCHEMA_KEY}' in its metadata); import its trajectories into a "
                "new database with `ase-bptt import FILE --db NEW.db --group-key KEY`"
            )
        if metadata.get(_SCHEMA_KEY, 0) > SCHEMA_VERSION:
            raise NotATrajectoryDBError(
                f"{self.name} has schema {metadata[_SCHEMA_KEY]}, newer than this ase-bptt "
                f"understands ({SCHEMA_VERSION}); upgrade ase-bptt"
            )
        return metadata

    @property
    def _db(self) -> Any:
        """The underlying ``ase.db`` database."""
        return self._store.db

    @contextmanager
    def _access_errors(self, *, new: bool = False) -> Iterator[None]:
        # Read-only files and folders, locks: one line saying what to do
        # instead of the backend's exception.
        try:
            yield
        except Exception as exc:
            problem = self._store.access_problem(exc, new=new)
            if problem is None:
                raise
            raise DatabaseAccessError(problem) from exc

    def check_writable(self) -> None:
        """Fail now, before any work, if writing would fail (read-only file or folder, a lock).

        Raises:
            DatabaseAccessError: with what to do.
        """
        with self._access_errors():
            self._store.check_writable()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        # One connection for a whole query: ase.db otherwise opens a new one
        # per returned row (to look up external tables), ~1 ms per frame.
        if self._depth:
            yield
            return
        with self._transaction(write=False):
            yield

    # ------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return f"TrajectoryDB({self.name!r}, {len(self)} trajectories)"

    def __len__(self) -> int:
        return self._db.count(is_final=True)

    def __contains__(self, traj_id: str) -> bool:
        return self._db.count(traj_id=traj_id, is_final=True) > 0

    @property
    def metadata(self) -> dict:
        """A copy of the database metadata."""
        return self._db.metadata

    def update_metadata(self, **values) -> None:
        """Add or change metadata entries (the schema version is protected)."""
        if _SCHEMA_KEY in values:
            raise ValueError(f"'{_SCHEMA_KEY}' is managed by ase-bptt")
        md = self._db.metadata
        md.update(values)
        self._db.metadata = md

    @contextmanager
    def transaction(self) -> Iterator[TrajectoryDB]:
        """Group writes into one transaction: all of them or none.

        The database's write lock is taken at the start, so what the block
        reads stays true until it commits (another writer waits; readers do
        not). Nested use joins the outer transaction.
        """
        with self._transaction(write=True):
            yield self

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self._access_errors(), self._store.transaction(write=write):
                yield
        finally:
            self._depth = 0

    # ------------------------------------------------------------ queries
    def traj_ids(self) -> set[str]:
        """Ids of all stored trajectories."""
        with self._reading():
            return {row.traj_id for row in self._db.select(is_final=True, include_data=False)}

    def find_hash(self, digest: str) -> str | None:
        """The traj_id stored with this content hash, or None."""
        with self._reading():
            for row in self._db.select(content_hash=digest, is_final=True, include_data=False, limit=1):
                return row.traj_id
        return None

    # ------------------------------------------------------------ writing
    def add_trajectory(
        self,
        frames: Sequence[Atoms],
        *,
        traj_id: str | None = None,
        label: str | None = None,
        source: str | None = None,
        split: str | None = None,
        declared: bool = False,
    ) -> str:
        """Validate and store one trajectory (one transaction).

        Args:
            frames: the relaxation frames in order, each with a calculator
                holding forces (and energy when known), e.g. a
                ``SinglePointCalculator``.
            traj_id: unique id; default ``<formula>-<first 12 hex of the
                content hash>``.
            label: free label, e.g. the defect type.
            source: where it came from.
            split: "train", "val" or "test"; usually left to
                :meth:`assign_splits`.
            declared: the split is the user's (a fixed test set, say), kept
                by :meth:`assign_splits` even with ``reassign`` (key
                ``split_declared``).

        Returns:
            The trajectory id.

        Raises:
            InvalidTrajectoryError: the frames fail :func:`validate_frames`.
            DuplicateTrajectoryError: the id or the content is already stored.
        """
        frames = list(frames)
        validate_frames(frames)
        digest = content_hash(frames)
        if traj_id is None:
            traj_id = f"{frames[0].get_chemical_formula()}-{digest[:12]}"
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if declared and split is None:
            raise ValueError("declared=True needs the split it declares")
        with self.transaction():
            if traj_id in self:
                raise DuplicateTrajectoryError(f"{self.name}: trajectory {traj_id!r} already exists")
            existing = self.find_hash(digest)
            if existing is not None:
                raise DuplicateTrajectoryError(
                    f"{self.name}: the same trajectory is already in the database as {existing}"
                )
            n = len(frames)
            fmaxes = []
            for atoms in frames:
                fmaxes.append(_movable_fmax(atoms, _frame_forces(atoms, 0)))
            converged = bool(fmaxes[-1] < self.converged_fmax)
            common = {"traj_id": traj_id, "n_frames": n, "converged": converged, "content_hash": digest}
            for key, value in (("label", label), ("source", source), ("split", split)):
                if value is not None:
                    common[key] = str(value)
            if declared:
                common["split_declared"] = True
            for i, atoms in enumerate(frames):
                self._db.write(
                    frame_row(atoms, _frame_forces(atoms, i), _frame_energy(atoms)),
                    frame=i,
                    is_final=(i == n - 1),
                    frame_fmax=fmaxes[i],
                    **common,
                )
        return traj_id

    def remove_trajectories(self, traj_ids: Sequence[str]) -> None:
        """Delete every frame of these trajectories, in one transaction.

        Raises:
            TrajectoryDBError: an id that is not stored (nothing is deleted then).
        """
        with self.transaction():
            missing = sorted(set(traj_ids) - self.traj_ids())
            if missing:
                raise TrajectoryDBError(f"{self.name} holds no trajectory {missing[0]!r}; nothing was removed")
            wanted = set(traj_ids)
            self._db.delete([i for i, kvp in self._key_value_pairs() if kvp["traj_id"] in wanted])

    def _key_value_pairs(self) -> list[tuple[int, dict]]:
        """``(row id, key-value pairs)`` of every frame row."""
        with self._reading():
            rows = self._store.key_value_pairs()
        return [(i, kvp) for i, kvp in rows if "traj_id" in kvp]

    # ------------------------------------------------------------ reading
    def trajectories(self, split: str | None = None, converged_only: bool = True) -> list[Trajectory]:
        """Load trajectories into memory (one query).

        Args:
            split: "train", "val", "test", or None for all.
            converged_only: leave out trajectories whose last frame is not
                relaxed (their last frame is no target for BPTT).

        Returns:
            Trajectories ordered by traj_id, frames ordered by frame index.
        """
        out = []
        for meta, records in self.read_records(split, converged_only):
            frames = []
            for r in records:
                atoms = Atoms(
                    constraint=r["constraints"], **{k: r[k] for k in ("numbers", "positions", "cell", "pbc", "masses")}
                )
                atoms.calc = SinglePointCalculator(atoms, energy=r["energy"], forces=r["forces"])
                frames.append(atoms)
            out.append(Trajectory(frames=frames, **{k: meta[k] for k in _TRAJECTORY_META}))
        return out

    def read_records(
        self,
        split: str | None = None,
        converged_only: bool = True,
        *,
        final_only: bool = False,
        traj_ids: Sequence[str] | None = None,
    ) -> list[tuple[dict, list[dict]]]:
        """Raw frames per trajectory, for datasets that build their own tensors: ``[(meta, [frame dict, ...]), ...]``.

        ``meta`` has traj_id, label, source, split, converged, n_frames; each frame dict
        has numbers, positions, cell, pbc, masses (None: defaults),
        constraints (list), energy (None when unknown) and forces, in frame
        order; trajectories ordered by traj_id. One query. ``final_only``:
        each trajectory's last frame only; ``traj_ids``: these trajectories only.
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
        with self._reading():
            records = self._store.frame_records(split, converged_only, final_only=final_only, traj_ids=traj_ids)
            records = [r for r in records if "traj_id" in r[0]]
        grouped: dict[str, list] = defaultdict(list)
        for kvp, frame in records:
            grouped[kvp["traj_id"]].append((kvp["frame"], kvp, frame))
        out = []
        for traj_id in sorted(grouped):
            rows = sorted(grouped[traj_id], key=lambda r: r[0])
            last = rows[-1][1]
            meta = {"traj_id": traj_id, "converged": bool(last["converged"]), "n_frames": int(last["n_frames"])}
            meta.update({key: last.get(key) for key in ("label", "source", "split")})
            out.append((meta, [r[2] for r in rows]))
        return out

    def check(self) -> list[str]:
        """Every break of the database's promises, one line each with what to do (empty: none).

        Whole trajectories (frames ``0 .. n_frames-1`` once each, one final
        frame), one split per trajectory, no trajectory stored twice; see
        :mod:`ase_bptt.data.integrity`. Reads the key-value pairs only.
        """
        with self._reading():
            rows = self._store.key_value_pairs()
        return integrity_problems(rows, self.name)

    def summary(self) -> str:
        """A printable table: trajectories and frames per split, label and convergence."""
        groups: Counter = Counter()
        frames: Counter = Counter()
        with self._reading():
            rows = list(self._db.select(is_final=True, include_data=False))
        for row in rows:
            key = (row.get("split") or "-", row.get("label") or "-", "yes" if row.converged else "no")
            groups[key] += 1
            frames[key] += row.n_frames
        title = f"{self.name}: {sum(groups.values())} trajectories, converged_fmax={self.converged_fmax} eV/A"
        return "\n".join([title, *settings_lines(self.metadata.get("splits")), *split_table(groups, frames)])

"""TrajectoryDB: relaxation trajectories stored in an ``ase.db`` database.

Layout (schema 1). One row per frame; the row's atoms carry a
``SinglePointCalculator`` with the frame's forces (and energy when known).
Key-value pairs on every row:

``traj_id`` (str)
    the trajectory the frame belongs to.
``frame`` (int)
    index of the frame in its trajectory, from 0.
``n_frames`` (int)
    number of frames in the trajectory.
``is_final`` (bool)
    True on the last frame only (one such row per trajectory).
``converged`` (bool)
    the max force on movable atoms of the last frame is below the database's
    ``converged_fmax`` (eV/A, in ``metadata``).
``frame_fmax`` (float)
    the max force on movable atoms of this frame (eV/A).
``content_hash`` (str)
    sha256 of positions, numbers, cell and forces of all frames: importing
    the same data twice adds nothing.
``split`` (str, optional)
    "train", "val" or "test", assigned per trajectory by :meth:`assign_splits`.
``source``, ``label`` (str, optional)
    where the trajectory came from (a file, a generator recipe) and a free
    label (e.g. the defect type).

``metadata`` holds ``{"ase_bptt_schema": 1, "converged_fmax": 0.05, ...}``.
Writes happen in one transaction per call; :meth:`TrajectoryDB.transaction`
groups several calls into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ase.db
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db.row import AtomsRow, atoms2dict

from ase_bptt.data.validate import (
    InvalidTrajectoryError,
    _frame_energy,
    _frame_forces,
    _movable_fmax,
    content_hash,
    validate_frames,
)
from ase_bptt.errors import AseBpttError

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "Trajectory",
    "TrajectoryDB",
    "TrajectoryDBError",
    "NotATrajectoryDBError",
    "InvalidTrajectoryError",
    "DuplicateTrajectoryError",
    # re-exported from ase_bptt.data.validate
    "validate_frames",
    "content_hash",
]

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
_SCHEMA_KEY = "ase_bptt_schema"


class TrajectoryDBError(AseBpttError):
    """Base class for errors about a trajectory database."""


class NotATrajectoryDBError(TrajectoryDBError):
    """The database exists but was not made by ase-bptt (or is newer)."""


class DuplicateTrajectoryError(TrajectoryDBError):
    """A trajectory with the same id or the same content is already stored."""


@dataclass
class Trajectory:
    """One relaxation as stored in the database.

    Attributes:
        traj_id: unique id of the trajectory.
        label: free label (e.g. the defect type) or None.
        source: where it came from (file path, generator recipe) or None.
        split: "train", "val", "test" or None when not assigned yet.
        converged: whether the last frame's max force is below the database's
            ``converged_fmax``.
        frames: the frames in order; each carries a ``SinglePointCalculator``
            with forces and, when known, energy.
    """

    traj_id: str
    label: str | None
    source: str | None
    split: str | None
    converged: bool
    frames: list[Atoms] = field(repr=False)

    @property
    def initial(self) -> Atoms:
        return self.frames[0]

    @property
    def final(self) -> Atoms:
        return self.frames[-1]


def _row(atoms: Atoms, forces: np.ndarray, energy: float | None) -> AtomsRow:
    # Built by hand: writing Atoms with a SinglePointCalculator makes ase
    # compare the atoms with the calculator's copy once per property (half of
    # the write time). Reading gives back a SinglePointCalculator.
    bare = atoms.copy()
    bare.calc = None
    dct = atoms2dict(bare)
    dct["calculator"] = "unknown"
    dct["calculator_parameters"] = {}
    dct["forces"] = np.array(forces, dtype=float)
    if energy is not None:
        dct["energy"] = float(energy)
    row = AtomsRow(dct)
    row.ctime = ase.db.core.now()
    row.user = os.getenv("USER")
    return row


def _split_of(traj_id: str, val: float, test: float, seed: int) -> str:
    # A hash of (seed, traj_id) mapped to [0, 1): the split of a trajectory
    # depends on nothing else, so importing more data never moves old ones.
    digest = hashlib.sha256(f"{seed}\0{traj_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


# ----------------------------------------------------------------- database
class TrajectoryDB:
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

    Raises:
        FileNotFoundError: ``create=False`` and the file does not exist.
        NotATrajectoryDBError: the database was made by another program or by
            a newer ase-bptt.
    """

    def __init__(
        self,
        url_or_path: str | os.PathLike,
        *,
        create: bool = True,
        converged_fmax: float | None = None,
    ) -> None:
        self.name = os.fspath(url_or_path)
        is_url = "://" in self.name
        if not is_url and not create and not Path(self.name).exists():
            raise FileNotFoundError(
                f"{self.name}: no such trajectory database; create one with `ase-bptt import` or `ase-bptt generate`"
            )
        if not is_url and self.name.endswith(".json"):
            # ase's JSON backend rewrites the whole file per write and has no
            # transactions, so imports could not be all-or-nothing.
            raise ValueError(
                f"{self.name}: a trajectory database is an SQLite file (e.g. data.db) or a "
                "database URL, not a JSON file"
            )
        try:
            # Plain paths are SQLite whatever their extension.
            kind = "extract_from_name" if is_url else "db"
            # SQLite locks by itself; ase's extra lock file costs two file
            # system calls per row.
            self._db = ase.db.connect(self.name, type=kind, use_lock_file=False)
            metadata = self._db.metadata
            n_rows = self._db.count()
        except Exception as exc:  # sqlite3.DatabaseError and friends: not a database at all
            raise NotATrajectoryDBError(
                f"{self.name} is not an ase.db database ({type(exc).__name__}: {exc}); "
                "import its trajectories into a new database with `ase-bptt import`"
            ) from exc
        self._depth = 0
        if _SCHEMA_KEY not in metadata:
            if n_rows:
                raise NotATrajectoryDBError(
                    f"{self.name} holds {n_rows} rows but was made by another program "
                    f"(no '{_SCHEMA_KEY}' in its metadata); import its trajectories into a "
                    "new database with `ase-bptt import`"
                )
            metadata = dict(metadata)
            metadata.update(
                {
                    _SCHEMA_KEY: SCHEMA_VERSION,
                    "converged_fmax": 0.05 if converged_fmax is None else float(converged_fmax),
                }
            )
            self._db.metadata = metadata
        elif metadata[_SCHEMA_KEY] > SCHEMA_VERSION:
            raise NotATrajectoryDBError(
                f"{self.name} has schema {metadata[_SCHEMA_KEY]}, newer than this ase-bptt "
                f"understands ({SCHEMA_VERSION}); upgrade ase-bptt"
            )
        self._add_id_indices()
        recorded = float(metadata["converged_fmax"])
        if converged_fmax is not None and not np.isclose(recorded, converged_fmax):
            raise ValueError(
                f"{self.name} records converged_fmax={recorded} eV/A; open it without "
                f"converged_fmax (or with {recorded}), or import into a new database"
            )
        self.converged_fmax = recorded

    def _add_id_indices(self) -> None:
        # ase.db's SQLite schema indexes the key tables by key only, so every
        # row update deletes by id with a full-table scan (quadratic in the
        # number of frames: minutes for assign_splits on 16k frames). Extra
        # indices are invisible to ase and make updates constant-time.
        if type(self._db).__name__ != "SQLite3Database":
            return
        try:
            self._create_indices()
        except sqlite3.OperationalError:
            pass  # a read-only database: reading works without them

    def _create_indices(self) -> None:
        with self._db.managed_connection() as con:
            for table in ("keys", "text_key_values", "number_key_values", "species"):
                con.execute(f"CREATE INDEX IF NOT EXISTS ase_bptt_{table}_id ON {table}(id)")
            # traj_id and content_hash lookups before every write.
            con.execute("CREATE INDEX IF NOT EXISTS ase_bptt_text_key_value ON text_key_values(key, value)")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        # One connection for a whole query: ase.db otherwise opens a new one
        # per returned row (to look up external tables), ~1 ms per frame.
        if self._depth:
            yield
            return
        with self.transaction():
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

        Nested use joins the outer transaction.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            with self._db:
                yield self
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
            for i, atoms in enumerate(frames):
                self._db.write(
                    _row(atoms, _frame_forces(atoms, i), _frame_energy(atoms)),
                    frame=i,
                    is_final=(i == n - 1),
                    frame_fmax=fmaxes[i],
                    **common,
                )
        return traj_id

    def assign_splits(
        self,
        val: float = 0.1,
        test: float = 0.1,
        seed: int = 0,
        *,
        reassign: bool = False,
    ) -> dict[str, int]:
        """Give every trajectory a split ("train", "val" or "test").

        Always per trajectory, never per frame: frames of one relaxation are
        near-duplicates. The split is a function of ``(seed, traj_id)`` only
        (a hash mapped to [0, 1)), so it is deterministic and does not change
        when more trajectories are imported later. Trajectories that already
        have a split keep it unless ``reassign``.

        Args:
            val: expected fraction for validation.
            test: expected fraction for test.
            seed: changes the assignment as a whole.
            reassign: recompute the split of every trajectory.

        Returns:
            The number of trajectories per split after the call.
        """
        if not (0 <= val and 0 <= test and val + test <= 1):
            raise ValueError(f"val={val} and test={test} must be fractions with val + test <= 1")
        rows_of: dict[str, list[int]] = defaultdict(list)
        current: dict[str, str | None] = {}
        changes: list[tuple[int, str]] = []
        with self.transaction():
            for row_id, kvp in self._key_value_pairs():
                rows_of[kvp["traj_id"]].append(row_id)
                if kvp.get("is_final"):
                    current[kvp["traj_id"]] = kvp.get("split")
            for traj_id, old in current.items():
                if old is not None and not reassign:
                    continue
                new = _split_of(traj_id, val, test, seed)
                if new != old:
                    changes.extend((row_id, new) for row_id in rows_of[traj_id])
            if type(self._db).__name__ == "SQLite3Database":
                self._set_splits_sqlite(changes)
            else:
                for row_id, new in changes:
                    self._db.update(row_id, split=new)
            self.update_metadata(splits={"val": val, "test": test, "seed": seed})
        counts = Counter(s for s in (self._final_rows_split()))
        return {s: counts.get(s, 0) for s in SPLITS}

    def _key_value_pairs(self) -> list[tuple[int, dict]]:
        """``(row id, key-value pairs)`` of every frame row."""
        if type(self._db).__name__ == "SQLite3Database":
            with self._reading():
                with self._db.managed_connection() as con:
                    rows = con.execute("SELECT id, key_value_pairs FROM systems").fetchall()
            out = [(i, json.loads(kvp)) for i, kvp in rows]
        else:
            with self._reading():
                out = [(row.id, row.key_value_pairs) for row in self._db.select(include_data=False)]
        return [(i, kvp) for i, kvp in out if "traj_id" in kvp]

    def _set_splits_sqlite(self, changes: list[tuple[int, str]]) -> None:
        # ase's update() re-reads and rewrites each row (~1 ms a frame); the
        # split lives in the row's key_value_pairs JSON and in ase's key
        # tables, so those are updated directly, inside the open transaction.
        if not changes:
            return
        new_split = dict(changes)
        mtime = ase.db.core.now()
        with self._db.managed_connection() as con:
            ids = list(new_split)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(f"SELECT id, key_value_pairs FROM systems WHERE id IN ({marks})", chunk).fetchall()
                con.executemany(
                    "UPDATE systems SET key_value_pairs=?, mtime=? WHERE id=?",
                    [(self._db.encode({**json.loads(kvp), "split": new_split[i]}), mtime, i) for i, kvp in rows],
                )
                con.execute(f"DELETE FROM text_key_values WHERE key='split' AND id IN ({marks})", chunk)
                con.execute(f"DELETE FROM keys WHERE key='split' AND id IN ({marks})", chunk)
            con.executemany("INSERT INTO text_key_values VALUES ('split', ?, ?)", [(v, i) for i, v in changes])
            con.executemany("INSERT INTO keys VALUES ('split', ?)", [(i,) for i, _ in changes])

    def _final_rows_split(self) -> list[str | None]:
        with self._reading():
            return [row.get("split") for row in self._db.select(is_final=True, include_data=False)]

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
        for meta, records in self._load(split, converged_only):
            frames = []
            for r in records:
                atoms = Atoms(
                    numbers=r["numbers"],
                    positions=r["positions"],
                    cell=r["cell"],
                    pbc=r["pbc"],
                    masses=r["masses"],
                    constraint=r["constraints"],
                )
                atoms.calc = SinglePointCalculator(atoms, energy=r["energy"], forces=r["forces"])
                frames.append(atoms)
            out.append(Trajectory(frames=frames, **meta))
        return out

    def _load(self, split: str | None, converged_only: bool) -> list[tuple[dict, list[dict]]]:
        """Raw frames per trajectory: ``[(meta, [frame dict, ...]), ...]``.

        ``meta`` has traj_id, label, source, split, converged; each frame dict
        has numbers, positions, cell, pbc, masses (None: defaults),
        constraints (list), energy (None when unknown) and forces, in frame
        order; trajectories ordered by traj_id. One query.
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
        if type(self._db).__name__ == "SQLite3Database":
            records = self._load_sqlite(split, converged_only)
        else:
            records = self._load_generic(split, converged_only)
        grouped: dict[str, list] = defaultdict(list)
        for kvp, frame in records:
            grouped[kvp["traj_id"]].append((kvp["frame"], kvp, frame))
        out = []
        for traj_id in sorted(grouped):
            rows = sorted(grouped[traj_id], key=lambda r: r[0])
            last = rows[-1][1]
            meta = dict(
                traj_id=traj_id,
                label=last.get("label"),
                source=last.get("source"),
                split=last.get("split"),
                converged=bool(last["converged"]),
            )
            out.append((meta, [r[2] for r in rows]))
        return out

    def _load_generic(self, split, converged_only):
        query = {}
        if split is not None:
            query["split"] = split
        if converged_only:
            query["converged"] = True
        out = []
        with self._reading():
            for row in self._db.select(include_data=False, **query):
                frame = dict(
                    numbers=row.numbers,
                    positions=row.positions,
                    cell=row.cell,
                    pbc=row.pbc,
                    masses=row.get("masses"),
                    constraints=row.constraints,
                    energy=row.get("energy"),
                    forces=row.forces,
                )
                out.append((row.key_value_pairs, frame))
        return out

    def _load_sqlite(self, split, converged_only):
        # ase's select() builds an AtomsRow per frame and looks up external
        # tables per row (~0.5 ms a frame); reading the columns directly is
        # several times faster for the 10^4-10^5 frames of a training split.
        from ase.constraints import dict2constraint
        from ase.io.jsonio import decode

        where, args = [], []
        if split is not None:
            where.append("id IN (SELECT id FROM text_key_values WHERE key='split' AND value=?)")
            args.append(split)
        if converged_only:
            where.append("id IN (SELECT id FROM number_key_values WHERE key='converged' AND value=1)")
        sql = "SELECT numbers, positions, cell, pbc, masses, constraints, energy, forces, key_value_pairs FROM systems"
        if where:
            sql += " WHERE " + " AND ".join(where)
        deblob = self._db.deblob
        out = []
        with self._reading():
            with self._db.managed_connection() as con:
                rows = con.execute(sql, args).fetchall()
        for numbers, positions, cell, pbc, masses, constraints, energy, forces, kvp in rows:
            kvp = json.loads(kvp)
            if "traj_id" not in kvp:
                continue
            frame = dict(
                numbers=deblob(numbers, np.int32).astype(np.int64),
                positions=deblob(positions, shape=(-1, 3)),
                cell=deblob(cell, shape=(3, 3)),
                pbc=(pbc & np.array([1, 2, 4])).astype(bool),
                masses=None if masses is None else deblob(masses),
                constraints=[dict2constraint(c) for c in decode(constraints)] if constraints else [],
                energy=energy,
                forces=deblob(forces, shape=(-1, 3)),
            )
            out.append((kvp, frame))
        return out

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
        header = ("split", "label", "converged", "trajectories", "frames")
        lines = [header]
        order = {s: i for i, s in enumerate(SPLITS)}
        for key in sorted(groups, key=lambda k: (order.get(k[0], 9), k[0], k[1], k[2])):
            lines.append((*key, str(groups[key]), str(frames[key])))
        lines.append(("total", "", "", str(sum(groups.values())), str(sum(frames.values()))))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [f"{self.name}: {sum(groups.values())} trajectories, converged_fmax={self.converged_fmax} eV/A"]
        for j, line in enumerate(lines):
            text.append(
                "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            )
            if j == 0:
                text.append("  ".join("-" * w for w in widths))
        return "\n".join(text)

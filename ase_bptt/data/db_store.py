"""How a :class:`~ase_bptt.data.db.TrajectoryDB` reaches its rows: any ``ase.db`` backend, or SQLite directly.

:func:`open_store` picks the implementation once, when the database is
opened. :class:`RowStore` goes through ase's public API and works with every
backend (PostgreSQL, MySQL, ...); :class:`SQLiteRowStore` reads and writes
ase's SQLite tables directly where ase's row-by-row API costs ~1 ms a frame,
and explains SQLite's access errors (read-only, locked) in words a user can
act on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ase.db
import numpy as np
from ase import Atoms
from ase.db.row import AtomsRow, atoms2dict

__all__ = ["PostgreSQLRowStore", "RowStore", "SQLiteRowStore", "frame_row", "open_store"]


class RowStore:
    """Rows of any ``ase.db`` backend, through ase's public API.

    Args:
        db: the connected ``ase.db`` database.
        name: its path or URL, for messages.
    """

    def __init__(self, db: Any, name: str) -> None:
        # Any: the SQLite store uses ase's SQLite3Database internals, which ase's type hints do not name.
        self.db = db
        self.name = name
        _commit_only_at_the_end(db)

    def prepare(self) -> None:
        """Make the database fast for ase-bptt's queries (nothing for generic backends)."""

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[None]:
        """One transaction: committed when the block ends, rolled back when it raises.

        ``write``: take the database's write lock at the start (waiting for
        another writer as long as the backend waits), so that what the block
        reads (which trajectories exist, their splits) stays true until it
        commits; two imports at once then run one after the other.
        """
        self.db.__enter__()
        try:
            if write:
                self.lock_for_writing()
            yield
        except BaseException:
            con, self.db.connection = self.db.connection, None
            # ase-db-backends (0.11) wraps psycopg2's connection in an object
            # without rollback(), so ase's __exit__ would fail and leave the
            # transaction open: roll back the wrapped connection instead.
            raw = con if hasattr(con, "rollback") else con.con
            raw.rollback()
            raw.close()
            raise
        self.db.__exit__(None, None, None)

    def lock_for_writing(self) -> None:
        """Take the write lock of the open transaction (nothing generically: the backend's own isolation)."""

    def check_writable(self) -> None:
        """Raise the backend's error now if a write would fail later (nothing to check generically)."""

    def access_problem(self, exc: BaseException, *, new: bool) -> str | None:
        """What to tell the user when ``exc`` means the database cannot be opened or written; None otherwise."""
        return None

    def key_value_pairs(self) -> list[tuple[int, dict]]:
        """``(row id, key-value pairs)`` of every row."""
        return [(row.id, row.key_value_pairs) for row in self.db.select(include_data=False)]

    def set_splits(self, changes: list[tuple[int, str]], *, declared: bool = False) -> None:
        """Set the ``split`` key of rows: ``[(row id, split), ...]`` (inside the caller's transaction).

        ``declared``: also set ``split_declared=True`` (the user's split, kept by a reassignment).
        """
        extra = {"split_declared": True} if declared else {}
        for row_id, new in changes:
            self.db.update(row_id, split=new, **extra)

    def frame_records(
        self,
        split: str | None,
        converged_only: bool,
        *,
        final_only: bool = False,
        traj_ids: Sequence[str] | None = None,
    ) -> list[tuple[dict, dict]]:
        """``(key-value pairs, frame dict)`` of every frame row matching the filters.

        The frame dict has numbers, positions, cell, pbc, masses (None:
        defaults), constraints (list), energy (None when unknown) and forces.
        ``final_only``: only the last frame of each trajectory; ``traj_ids``:
        only these trajectories.
        """
        query: dict = {}
        if split is not None:
            query["split"] = split
        if converged_only:
            query["converged"] = True
        if final_only:
            query["is_final"] = True
        rows = (
            self.db.select(include_data=False, **query)
            if traj_ids is None
            else (row for t in traj_ids for row in self.db.select(include_data=False, traj_id=t, **query))
        )
        out = []
        for row in rows:
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


class PostgreSQLRowStore(RowStore):
    """ase-db-backends' PostgreSQL: ase's public API, plus a table lock for writers."""

    def lock_for_writing(self) -> None:
        # SHARE ROW EXCLUSIVE conflicts with itself and with row writes, not with reads:
        # one writer at a time, as SQLite's BEGIN IMMEDIATE.
        self.db.connection.cursor().execute("LOCK TABLE systems IN SHARE ROW EXCLUSIVE MODE")


class SQLiteRowStore(RowStore):
    """ase's SQLite tables, read and updated directly where ase's API is slow."""

    def prepare(self) -> None:
        # ase.db's SQLite schema indexes the key tables by key only, so every
        # row update deletes by id with a full-table scan (quadratic in the
        # number of frames: minutes for assign_splits on 16k frames). Extra
        # indices are invisible to ase and make updates constant-time.
        try:
            with self.db.managed_connection() as con:
                for table in ("keys", "text_key_values", "number_key_values", "species"):
                    con.execute(f"CREATE INDEX IF NOT EXISTS ase_bptt_{table}_id ON {table}(id)")
                # traj_id and content_hash lookups before every write.
                con.execute("CREATE INDEX IF NOT EXISTS ase_bptt_text_key_value ON text_key_values(key, value)")
        except sqlite3.OperationalError:
            pass  # a read-only or locked database: reading works without them

    def lock_for_writing(self) -> None:
        # BEGIN IMMEDIATE takes SQLite's RESERVED lock now: other writers wait (ase's 20 s busy
        # timeout), readers go on. Python's sqlite3 then issues no BEGIN of its own.
        self.db.connection.execute("BEGIN IMMEDIATE")

    def check_writable(self) -> None:
        # A write that changes a page needs the journal file beside the
        # database, so a read-only file, a read-only folder and a lock all
        # show here; the rollback leaves the file as it was.
        con = self.db._connect()  # ase's own connection: it waits for a lock as long as ase does
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO information VALUES ('ase_bptt_write_check', '')")
        finally:
            con.rollback()
            con.close()

    def access_problem(self, exc: BaseException, *, new: bool) -> str | None:
        if not isinstance(exc, sqlite3.OperationalError):
            return None
        text = str(exc)
        folder = Path(self.name).resolve().parent
        if "locked" in text:
            return (
                f"{self.name} is locked by another program (SQLite: {text}); wait until that program "
                "(another import, generate or training run?) has finished and run again"
            )
        if new and "unable to open" in text:
            return (
                f"{self.name}: cannot create the database (SQLite: {text}); the folder {folder} is missing "
                "or not writable: choose a file in a writable folder"
            )
        if "readonly" in text or "unable to open" in text:
            return (
                f"{self.name}: cannot write to it (SQLite: {text}); make the file and its folder {folder} "
                f"writable (SQLite writes {Path(self.name).name}-journal beside it), or write to a database "
                "in a writable folder"
            )
        return None

    def key_value_pairs(self) -> list[tuple[int, dict]]:
        with self.db.managed_connection() as con:
            rows = con.execute("SELECT id, key_value_pairs FROM systems").fetchall()
        return [(i, json.loads(kvp)) for i, kvp in rows]

    def set_splits(self, changes: list[tuple[int, str]], *, declared: bool = False) -> None:
        # ase's update() re-reads and rewrites each row (~1 ms a frame); the
        # split lives in the row's key_value_pairs JSON and in ase's key
        # tables, so those are updated directly, inside the open transaction.
        if not changes:
            return
        new_split = dict(changes)
        extra = {"split_declared": True} if declared else {}
        mtime = ase.db.core.now()
        with self.db.managed_connection() as con:
            ids = list(new_split)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(f"SELECT id, key_value_pairs FROM systems WHERE id IN ({marks})", chunk).fetchall()
                con.executemany(
                    "UPDATE systems SET key_value_pairs=?, mtime=? WHERE id=?",
                    [
                        (self.db.encode({**json.loads(kvp), "split": new_split[i], **extra}), mtime, i)
                        for i, kvp in rows
                    ],
                )
                keys = [("split", "text_key_values")] + ([("split_declared", "number_key_values")] if declared else [])
                for key, table in keys:
                    con.execute(f"DELETE FROM {table} WHERE key='{key}' AND id IN ({marks})", chunk)
                    con.execute(f"DELETE FROM keys WHERE key='{key}' AND id IN ({marks})", chunk)
            con.executemany("INSERT INTO text_key_values VALUES ('split', ?, ?)", [(v, i) for i, v in changes])
            con.executemany("INSERT INTO keys VALUES ('split', ?)", [(i,) for i, _ in changes])
            if declared:
                con.executemany("INSERT INTO number_key_values VALUES ('split_declared', 1, ?)", [(i,) for i in ids])
                con.executemany("INSERT INTO keys VALUES ('split_declared', ?)", [(i,) for i in ids])

    def frame_records(
        self,
        split: str | None,
        converged_only: bool,
        *,
        final_only: bool = False,
        traj_ids: Sequence[str] | None = None,
    ) -> list[tuple[dict, dict]]:
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
        if final_only:
            where.append("id IN (SELECT id FROM number_key_values WHERE key='is_final' AND value=1)")
        sql = "SELECT numbers, positions, cell, pbc, masses, constraints, energy, forces, key_value_pairs FROM systems"
        chunks: list[list[str]] = [[]]
        if traj_ids is not None:
            ids = list(traj_ids)
            chunks = [ids[i : i + 500] for i in range(0, len(ids), 500)]
        deblob = self.db.deblob
        rows = []
        with self.db.managed_connection() as con:
            for chunk in chunks:
                clauses, values = list(where), list(args)
                if traj_ids is not None:
                    marks = ",".join("?" * len(chunk))
                    clauses.append(f"id IN (SELECT id FROM text_key_values WHERE key='traj_id' AND value IN ({marks}))")
                    values += chunk
                text = sql + (" WHERE " + " AND ".join(clauses) if clauses else "")
                rows += con.execute(text, values).fetchall()
        out = []
        for numbers, positions, cell, pbc, masses, constraints, energy, forces, kvp in rows:
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
            out.append((json.loads(kvp), frame))
        return out


def frame_row(atoms: Atoms, forces: np.ndarray, energy: float | None) -> AtomsRow:
    """The ase.db row of one frame: its atoms, forces and (when known) energy."""
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
    dct["ctime"] = ase.db.core.now()
    dct["user"] = os.getenv("USER")
    return AtomsRow(dct)


def _commit_only_at_the_end(db: Any) -> None:
    """Make ``with db:`` one transaction.

    ase's SQLite backend (and ase-db-backends' PostgreSQL and MySQL, which
    derive from it) commits every 5,000 uses of the open connection even
    inside ``with db:`` (``managed_connection(commit_frequency=5000)``), so
    an import of more than a few thousand frames killed part-way would leave
    part of it behind. Inside ``with db:`` only its end commits.
    """
    base = getattr(type(db), "managed_connection", None)
    if base is None:
        return

    @contextmanager
    def managed_connection(commit_frequency: int = 5000) -> Iterator[Any]:
        with base(db, commit_frequency=sys.maxsize if db.connection is not None else commit_frequency) as con:
            yield con

    db.managed_connection = managed_connection


#: DB-API drivers whose exceptions come from the database itself (:func:`is_backend_error`).
DRIVER_MODULES = ("sqlite3", "psycopg2", "psycopg", "pymysql", "MySQLdb")


def is_backend_error(exc: BaseException) -> bool:
    """True when ``exc`` comes from the database side: the file system, a missing driver, ase.db refusing the
    URL or file (ValueError), or a DB-API driver's own error. Those become one error line; anything else
    (a TypeError, an AttributeError, ...) is a bug in ase-bptt and keeps its traceback."""
    if isinstance(exc, (OSError, ImportError, ValueError, sqlite3.Error)):
        return True
    return type(exc).__module__.split(".")[0] in DRIVER_MODULES


def open_store(name: str) -> RowStore:
    """Connect to ``name`` (a file path, always SQLite, or an ``ase.db`` URL) and pick its row store."""
    is_url = "://" in name
    # Plain paths are SQLite whatever their extension; SQLite locks by
    # itself, and ase's extra lock file costs two file system calls per row.
    db = ase.db.connect(name, type="extract_from_name" if is_url else "db", use_lock_file=False)
    kind = {"SQLite3Database": SQLiteRowStore, "PostgreSQLDatabase": PostgreSQLRowStore}.get(type(db).__name__)
    return (kind or RowStore)(db, os.fspath(name))

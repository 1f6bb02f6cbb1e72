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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ase.db
import numpy as np
from ase import Atoms
from ase.db.row import AtomsRow, atoms2dict

__all__ = ["RowStore", "SQLiteRowStore", "frame_row", "open_store"]


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

    def prepare(self) -> None:
        """Make the database fast for ase-bptt's queries (nothing for generic backends)."""

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        self.db.__enter__()
        try:
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

    def check_writable(self) -> None:
        """Raise the backend's error now if a write would fail later (nothing to check generically)."""

    def access_problem(self, exc: BaseException, *, new: bool) -> str | None:
        """What to tell the user when ``exc`` means the database cannot be opened or written; None otherwise."""
        return None

    def key_value_pairs(self) -> list[tuple[int, dict]]:
        """``(row id, key-value pairs)`` of every row."""
        return [(row.id, row.key_value_pairs) for row in self.db.select(include_data=False)]

    def set_splits(self, changes: list[tuple[int, str]]) -> None:
        """Set the ``split`` key of rows: ``[(row id, split), ...]`` (inside the caller's transaction)."""
        for row_id, new in changes:
            self.db.update(row_id, split=new)

    def frame_records(self, split: str | None, converged_only: bool) -> list[tuple[dict, dict]]:
        """``(key-value pairs, frame dict)`` of every frame row matching the filters.

        The frame dict has numbers, positions, cell, pbc, masses (None:
        defaults), constraints (list), energy (None when unknown) and forces.
        """
        query: dict = {}
        if split is not None:
            query["split"] = split
        if converged_only:
            query["converged"] = True
        out = []
        for row in self.db.select(include_data=False, **query):
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

    def set_splits(self, changes: list[tuple[int, str]]) -> None:
        # ase's update() re-reads and rewrites each row (~1 ms a frame); the
        # split lives in the row's key_value_pairs JSON and in ase's key
        # tables, so those are updated directly, inside the open transaction.
        if not changes:
            return
        new_split = dict(changes)
        mtime = ase.db.core.now()
        with self.db.managed_connection() as con:
            ids = list(new_split)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(f"SELECT id, key_value_pairs FROM systems WHERE id IN ({marks})", chunk).fetchall()
                con.executemany(
                    "UPDATE systems SET key_value_pairs=?, mtime=? WHERE id=?",
                    [(self.db.encode({**json.loads(kvp), "split": new_split[i]}), mtime, i) for i, kvp in rows],
                )
                con.execute(f"DELETE FROM text_key_values WHERE key='split' AND id IN ({marks})", chunk)
                con.execute(f"DELETE FROM keys WHERE key='split' AND id IN ({marks})", chunk)
            con.executemany("INSERT INTO text_key_values VALUES ('split', ?, ?)", [(v, i) for i, v in changes])
            con.executemany("INSERT INTO keys VALUES ('split', ?)", [(i,) for i, _ in changes])

    def frame_records(self, split: str | None, converged_only: bool) -> list[tuple[dict, dict]]:
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
        deblob = self.db.deblob
        with self.db.managed_connection() as con:
            rows = con.execute(sql, args).fetchall()
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


def open_store(name: str) -> RowStore:
    """Connect to ``name`` (a file path, always SQLite, or an ``ase.db`` URL) and pick its row store."""
    is_url = "://" in name
    # Plain paths are SQLite whatever their extension; SQLite locks by
    # itself, and ase's extra lock file costs two file system calls per row.
    db = ase.db.connect(name, type="extract_from_name" if is_url else "db", use_lock_file=False)
    if type(db).__name__ == "SQLite3Database":
        return SQLiteRowStore(db, os.fspath(name))
    return RowStore(db, name)

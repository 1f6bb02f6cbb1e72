"""TrajectoryDB on PostgreSQL (``ase-bptt[postgres]``) against a throw-away server the test starts itself.

The server is ``initdb`` + ``pg_ctl`` on a temporary folder and a free port
(Debian's ``postgresql`` package; ``.ci/run`` installs it). The tests skip,
saying why, where the server programs or the Python driver are missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.ingest import import_paths
from ase_bptt.data.splits import SplitFractions

#: Arrays go through PostgreSQL as float8 arrays, as through SQLite as float64 blobs: bit-exact.
EXACT = 0.0


def _server_program(name: str) -> str | None:
    # Debian keeps the server programs out of PATH, under /usr/lib/postgresql/<version>/bin.
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://...`` of an empty database on a server started for this test session."""
    pytest.importorskip("ase_db_backends", reason="ase-db-backends is not installed (pip install ase-bptt[postgres])")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install ase-bptt[postgres])")
    initdb, pg_ctl = _server_program("initdb"), _server_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ase-bptt-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "ase"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=localhost -c fsync=off"
    start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        import psycopg2

        con = psycopg2.connect(host="localhost", port=port, user="ase", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE trajectories")
        con.close()
        yield f"postgresql://ase@localhost:{port}/trajectories"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_import_and_read_back_as_sqlite_does(postgres_url, vasp_data, tmp_path):
    splits = SplitFractions(val=0.25, test=0.25, seed=1)
    on_postgres = TrajectoryDB(postgres_url)
    on_sqlite = TrajectoryDB(tmp_path / "t.db")
    for db in (on_postgres, on_sqlite):
        report = import_paths([vasp_data], db, label="vasp", splits=splits)
        assert len(report.added) == 4
    a = on_postgres.trajectories(converged_only=False)
    b = on_sqlite.trajectories(converged_only=False)
    assert [(t.traj_id, t.split, t.label, t.converged) for t in a] == [
        (t.traj_id, t.split, t.label, t.converged) for t in b
    ]
    for ta, tb in zip(a, b):
        assert len(ta.frames) == len(tb.frames)
        for fa, fb in zip(ta.frames, tb.frames):
            assert np.abs(fa.positions - fb.positions).max() <= EXACT
            assert np.abs(fa.get_forces() - fb.get_forces()).max() <= EXACT
            assert fa.get_potential_energy() == fb.get_potential_energy()
    assert [meta for meta, _ in on_postgres.read_records("train")] == [
        meta for meta, _ in on_sqlite.read_records("train")
    ]
    assert on_postgres.summary().splitlines()[1:] == on_sqlite.summary().splitlines()[1:]

    # all-or-nothing: a failure inside a transaction leaves no rows behind
    rows = on_postgres._db.count()
    frames = on_sqlite.trajectories(converged_only=False)[0].frames
    for frame in frames:
        frame.positions += 0.01  # new content, so no duplicate
    with pytest.raises(RuntimeError), on_postgres.transaction():
        on_postgres.add_trajectory(frames, traj_id="rolled-back")
        raise RuntimeError("killed")
    assert on_postgres._db.count() == rows and "rolled-back" not in on_postgres

    # a second import of the same data adds nothing
    assert import_paths([vasp_data], TrajectoryDB(postgres_url)).added == []


def test_two_imports_at_once_skip_what_the_other_added(postgres_url, tmp_path):
    # The import's table lock makes the second writer wait and see what the first added.
    import psycopg2

    from tests.test_data_transactions import cli_process, write_relaxations

    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    con = psycopg2.connect(host="localhost", port=port, user="ase", dbname="postgres")
    con.autocommit = True
    con.cursor().execute("CREATE DATABASE concurrent")
    con.close()
    url = postgres_url.rsplit("/", 1)[0] + "/concurrent"
    TrajectoryDB(url)  # made first: the race of two creators is not the question here
    files = write_relaxations(tmp_path / "runs", 60, 10, seed=4)
    procs = [cli_process("import", *chunk, "--db", url) for chunk in (files[:40], files[20:])]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    added = [int(out.split("added ")[1].split()[0]) for out, _ in outputs]
    assert sum(added) == 60
    db = TrajectoryDB(url)
    assert len(db) == 60 and db.check() == []

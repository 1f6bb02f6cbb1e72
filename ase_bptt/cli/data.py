"""``ase-bptt generate``, ``import`` and ``info``: getting relaxations into a database and looking at files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ase_bptt.cli._group import cli, command, one_line
from ase_bptt.cli.options import (
    RegistryChoice,
    declared_split_option,
    key_values,
    progress_enabled,
    recipe_names,
    refuse_with_declared,
    runtime_options,
    split_fractions,
    split_options,
)


# ------------------------------------------------------------------- data
@command(
    cli,
    "generate",
    example="ase-bptt generate si-defects si.db -n 300 --workers 2",
    short_help="Make reference relaxations with a built-in recipe (no DFT code needed).",
)
@click.argument("recipe", type=RegistryChoice(recipe_names))
@click.argument("db", type=click.Path(dir_okay=False))
@click.option(
    "-n",
    "n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Trajectories the database should hold for this recipe and seed (a re-run tops up).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    callback=key_values,
    metavar="KEY=VALUE",
    help="Recipe option (repeatable), e.g. --option size=3 --option sigma=0.05.",
)
@click.option(
    "--reference",
    default=None,
    metavar="NAME|MODULE:CLASS",
    help="Reference calculator: sw, tersoff, emt or module:Class  [default: the recipe's]",
)
@split_options
@runtime_options(device=False, dtype=False, seed=True, workers=True)
@click.pass_context
def generate_cmd(ctx, recipe, db, n, options, reference, val, test, hold_out_label, hold_out_element, seed, workers):
    """Generate relaxation trajectories into DB with RECIPE and assign train/val/test
    splits. si-defects: 64-site diamond silicon with one point defect, relaxed with
    Stillinger-Weber (needs matscipy); alloys: binary fcc alloys with ASE's EMT;
    fcc-defects: Cu with vacancies and Ni/Pd/Ag/Pt/Au/Al solutes (EMT), for hold-out splits."""
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.generate import generate
    from ase_bptt.data.recipes import RECIPES

    try:
        RECIPES[recipe].options(options)
    except ValueError as exc:
        raise click.BadParameter(one_line(exc), param_hint="--option") from None
    splits = split_fractions(val, test, seed, hold_out_label, hold_out_element)
    with _removed_if_new_and_failing(db):
        database = TrajectoryDB(db, create=True)
        added = generate(
            recipe,
            database,
            n=n,
            seed=seed,
            workers=workers,
            progress=progress_enabled(ctx),
            reference=reference,
            splits=splits,
            **options,
        )
    click.echo(f"added {added} trajectories to {db}")
    click.echo(database.summary())


@command(
    cli,
    "import",
    example="ase-bptt import vasp_runs/ OUTCAR_* --db traj.db",
    short_help="Import DFT relaxations (vasprun.xml, OUTCAR, .traj, extxyz, MPtrj JSON, ...).",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--db", "db", required=True, type=click.Path(dir_okay=False), help="Database to add to (created if new).")
@click.option(
    "--label",
    default=None,
    help="Label stored with every imported trajectory (e.g. the defect type)  [default: each file's --label-key]",
)
@click.option(
    "--label-key",
    default="label",
    show_default=True,
    help="atoms.info key (extxyz, .traj) whose value labels a trajectory when --label is not given.",
)
@click.option(
    "--group-key",
    default=None,
    metavar="KEY",
    help="For an ase.db file: the key whose value tells its relaxations apart (one trajectory per value).",
)
@split_options
@declared_split_option(
    "Declare the split of every trajectory this import adds, e.g. test for your fixed test set "
    "(kept by `split --reassign`); not with --val/--test."
)
@runtime_options(device=False, dtype=False, seed=True)
@click.pass_context
def import_cmd(
    ctx, paths, db, label, label_key, group_key, val, test, hold_out_label, hold_out_element, declared, seed
):
    """Import every relaxation found in PATHS (files or directories, one relaxation per
    file) into --db, skipping (and listing) the invalid ones and the copies of one
    relaxation (positions within 1e-4 A), and assign splits in the same transaction.
    Exits with status 1 when nothing was added and something was skipped."""
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.ingest import import_paths

    if declared is not None:
        refuse_with_declared(ctx, "--val", "--test")
    splits = split_fractions(val, test, seed, hold_out_label, hold_out_element)
    new = "://" not in db and not Path(db).exists()
    with _removed_if_new_and_failing(db):
        database = TrajectoryDB(db, create=True)
        report = import_paths(
            list(paths),
            database,
            label=label,
            label_key=label_key,
            group_key=group_key,
            splits=splits,
            split=declared,
        )
    click.echo(str(report))
    if not report.added and report.skipped:
        if new:  # leave no empty database behind
            Path(db).unlink(missing_ok=True)
        raise click.ClickException(
            f"nothing imported into {db}: every input was skipped ({len(report.skipped)}, reasons above)"
        )
    click.echo(database.summary())


@command(
    cli,
    "split",
    example="ase-bptt split fcc.db --hold-out-element Ni --reassign",
    short_help="(Re)assign train/val/test splits of a database, e.g. holding out an element or a defect kind.",
)
@click.argument("db", type=click.Path(dir_okay=False))
@split_options
@click.option(
    "--reassign", is_flag=True, help="Recompute every split but the declared ones (default: keep those assigned)."
)
@declared_split_option("Declare this split for the trajectories named by --traj-id and --source (kept by --reassign).")
@click.option("--traj-id", "traj_ids", multiple=True, metavar="PATTERN", help="With --split: traj_ids (shell pattern).")
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="PATTERN",
    help="With --split: the imported files, as they were named on import (shell pattern, e.g. 'paper/*').",
)
@runtime_options(device=False, dtype=False, seed=True)
@click.pass_context
def split_cmd(ctx, db, val, test, hold_out_label, hold_out_element, reassign, declared, traj_ids, sources, seed):
    """Assign train/val/test splits to the trajectories of DB that have none (all of
    them but the declared ones with --reassign). A hold-out puts whole groups in test:
    every trajectory with a --hold-out-label, every one containing a --hold-out-element
    (which then occurs in no train or val trajectory). The settings are recorded in the
    database. With --split, declare instead the split of the trajectories named by
    --traj-id and --source, e.g. your fixed test set."""
    from ase_bptt.data.db import TrajectoryDB

    if declared is None and (traj_ids or sources):
        raise click.UsageError("--traj-id and --source name the trajectories for --split; give --split too")
    if declared is not None:
        refuse_with_declared(ctx, "--val", "--test", "--hold-out-label", "--hold-out-element", "--reassign", "--seed")
        if not (traj_ids or sources):
            raise click.UsageError("--split needs the trajectories it declares: --traj-id PATTERN or --source PATTERN")
        database = TrajectoryDB(db, create=False)
        chosen = database.declare_split(declared, traj_ids=traj_ids, sources=sources)
        click.echo(f"declared {declared}: {len(chosen)} trajectories")
        click.echo(database.summary())
        return
    splits = split_fractions(val, test, seed, hold_out_label, hold_out_element)
    database = TrajectoryDB(db, create=False)
    counts = database.assign_splits(
        val=splits.val, test=splits.test, seed=splits.seed, hold_out=splits.hold_out, reassign=reassign
    )
    click.echo("splits: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    click.echo(database.summary())


@contextmanager
def _removed_if_new_and_failing(db: str) -> Iterator[None]:
    # A command that fails (or is interrupted) before it wrote a trajectory into a database it
    # created leaves no file holding only metadata behind. A database with trajectories stays:
    # an interrupted generate resumes from it.
    new = "://" not in db and not Path(db).exists()
    try:
        yield
    except BaseException:
        if new and not Path(f"{db}-journal").exists() and _holds_no_rows(Path(db)):
            Path(db).unlink(missing_ok=True)
        raise


def _holds_no_rows(path: Path) -> bool:
    import sqlite3

    if not path.exists():
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM systems").fetchone()[0] == 0
    except sqlite3.Error:  # no systems table yet (created, never initialised), or locked by another writer
        return path.stat().st_size == 0


@command(
    cli,
    "check",
    example="ase-bptt check traj.db",
    short_help="Check a database's integrity (read-only): whole trajectories, one split each, nothing twice.",
)
@click.argument("db")
def check_cmd(db):
    """Check that every trajectory of DB is whole (frames 0..n-1 once each, one final
    frame), has one split, and is stored once. Reads only; exits with status 1 and one
    line per problem (with what to do) otherwise."""
    from ase_bptt.data.db import TrajectoryDB

    database = TrajectoryDB(db, read_only=True)
    problems = database.check()
    for line in problems:
        click.echo(line)
    if problems:
        raise click.ClickException(f"{db}: {len(problems)} problem(s), listed above")
    click.echo(
        f"{db}: {len(database)} trajectories, each whole (frames 0..n-1 once, one final frame) with one split; "
        "no trajectory stored twice"
    )


@command(
    cli,
    "info",
    example="ase-bptt info si.pt",
    short_help="Describe a database (splits, labels) or a checkpoint (model, step rule, history).",
)
@click.argument("path")
def info_cmd(path):
    """Describe PATH: an ase-bptt trajectory database or an ase-bptt checkpoint
    (detected from the file's content)."""
    from ase_bptt.workflows.info import describe

    click.echo(describe(path))

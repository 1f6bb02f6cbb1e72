"""The ``ase-bptt`` command line: parses arguments and calls the data/train functions.

Design rule: no pipeline logic lives here. Each command validates its options,
calls one function from :mod:`ase_bptt.data` or :mod:`ase_bptt.train`, and
prints what it returned. Heavy imports (torch, ase) happen inside the commands
so ``ase-bptt --help`` stays fast.

User errors (a missing file, a bad checkpoint, an unknown element, an empty
split, a database made by another program, ...) are caught in one place,
:meth:`_Group.invoke`, and shown as one ``Error: ...`` line with exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["main", "cli", "user_errors"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes shown as one line instead of a traceback.

    Every error ase-bptt raises on purpose derives from
    :class:`~ase_bptt.errors.AseBpttError`; the rest are the OS's file errors
    and ASE's "unknown file type".
    """
    from ase.io.formats import UnknownFileTypeError

    from ase_bptt.errors import AseBpttError

    return (
        AseBpttError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        UnknownFileTypeError,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text or type(exc).__name__


class _Group(click.Group):
    """The ``ase-bptt`` group: one-line user errors, commands listed with an example each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except user_errors() as exc:
            raise click.ClickException(_one_line(exc)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Workflow order (data -> training -> use -> demo), not alphabetical.
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = [(n, c) for n in self.list_commands(ctx) if (c := self.get_command(ctx, n)) and not c.hidden]
        if not commands:
            return
        first = max(len(n) for n, _ in commands) + 3
        with formatter.section("Commands"):
            indent = " " * (formatter.current_indent + first)
            text_width = max((formatter.width or 80) - len(indent), 30)
            for name, cmd in commands:
                summary = click.formatting.wrap_text(cmd.get_short_help_str(limit=200), text_width)
                lines = summary.splitlines() or [""]
                formatter.write(" " * formatter.current_indent + name.ljust(first) + lines[0] + "\n")
                for line in lines[1:]:
                    formatter.write(indent + line + "\n")
                example = getattr(cmd, "example", None)
                if example:
                    # Examples are never wrapped, so they can be copied as they are.
                    formatter.write(f"{indent}e.g. {example}\n")


class _StepRuleChoice(click.Choice):
    """The registered step rules, read when first needed (importing them loads torch; --help should not)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from ase_bptt.relax.registry import step_rule_names

        return step_rule_names()

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns; the registry is the source
        pass


def _command(group: click.Group, name: str, *, example: str, **kwargs: Any) -> Callable:
    """``group.command`` that also records a one-line example and shows it in the epilog."""

    def deco(f: Callable) -> click.Command:
        epilog = "\b\nExample:\n  " + example
        cmd = group.command(name, epilog=epilog, **kwargs)(f)
        cmd.example = example  # type: ignore[attr-defined]
        return cmd

    return deco


# ----------------------------------------------------------- shared options
def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from ase_bptt.train.distributed import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def runtime_options(*, device: bool = True, dtype: bool = True, seed: bool = False, workers: bool = False) -> Callable:
    """The shared ``--device``, ``--dtype``, ``--seed`` and ``--workers`` options, where they apply."""

    def deco(f: Callable) -> Callable:
        opts = []
        if device:
            opts.append(
                click.option(
                    "--device",
                    default=None,
                    callback=_check_device,
                    metavar="DEVICE",
                    help="cpu, cuda or cuda:N  [default: cuda when available, else cpu]",
                )
            )
        if dtype:
            opts.append(
                click.option(
                    "--dtype",
                    type=click.Choice(["float32", "float64"]),
                    default="float32",
                    show_default=True,
                    help="Floating point precision of the model.",
                )
            )
        if seed:
            opts.append(
                click.option(
                    "--seed",
                    type=int,
                    default=0,
                    show_default=True,
                    help="Random seed (same seed and settings: same result).",
                )
            )
        if workers:
            opts.append(
                click.option(
                    "--workers",
                    type=click.IntRange(min=1),
                    default=1,
                    show_default=True,
                    help="Parallel worker processes.",
                )
            )
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def training_options(*, init_help: str, epochs_help: str, batch_help: str, lr_help: str) -> Callable:
    """The options ``pretrain`` and ``finetune`` share: DB, --out, --init, --epochs, --time-budget,
    --batch-size, --lr, --overwrite and the runtime options (the command's context comes first)."""
    shared = [
        click.argument("db", type=click.Path()),
        click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write."),
        click.option("--init", type=click.Path(dir_okay=False), default=None, help=init_help),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help=epochs_help),
        click.option(
            "--time-budget",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="SECONDS",
            help="Stop (keeping the best model) after this many seconds of training.",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help=batch_help),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help=lr_help),
        click.option("--overwrite", is_flag=True, help="Replace an --out made with other settings or data."),
        runtime_options(seed=True),
    ]

    def deco(f: Callable) -> Callable:
        for opt in reversed(shared):
            f = opt(f)
        return click.pass_context(f)

    return deco


def _progress(ctx: click.Context) -> bool:
    return not ctx.find_root().params.get("quiet", False)


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.01,0.02,0.05") from None
    if not values or any(not v > 0 for v in values):
        raise click.BadParameter(f"{value!r}: give positive numbers, e.g. 0.01,0.02,0.05")
    return values


def _key_values(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE, e.g. --option repeat=3")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def split_options(f: Callable) -> Callable:
    """``--val`` and ``--test``: fractions of trajectories for validation and testing."""
    for name, purpose in (("--test", "testing"), ("--val", "validation")):
        help_text = f"Fraction of trajectories for {purpose} (--val + --test < 1)."
        f = click.option(
            name, type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True, help=help_text
        )(f)
    return f


def _split_fractions(val: float, test: float, seed: int) -> Any:
    # Checked before the database is opened, so a bad pair writes nothing.
    from ase_bptt.data.splits import SplitFractionError, SplitFractions

    try:
        return SplitFractions(val=val, test=test, seed=seed)
    except SplitFractionError:
        raise click.BadParameter(
            f"--val {val} and --test {test} add up to {val + test:g}; they must leave some for training "
            "(val + test < 1), e.g. --val 0.1 --test 0.1",
            param_hint="'--val' / '--test'",
        ) from None


# -------------------------------------------------------------------- group
@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="ase-bptt", prog_name="ase-bptt")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def cli(quiet: bool) -> None:
    """Fine-tune machine-learned interatomic potentials by backpropagation through
    whole relaxations (BPTT), and use them from ASE.

    \b
    Practitioner workflow:
      ase-bptt import vasp_runs/ --db traj.db      # your DFT relaxations
      ase-bptt finetune traj.db -o si.pt           # pretrains first if no --init
      ase-bptt relax POSCAR --model si.pt -o CONTCAR
    or in Python: atoms.calc = BPTTCalculator("si.pt")
    """


# ------------------------------------------------------------------- data
@_command(
    cli,
    "generate",
    example="ase-bptt generate si-defects si.db -n 300 --workers 2",
    short_help="Make reference relaxations with a built-in recipe (no DFT code needed).",
)
@click.argument("recipe", type=click.Choice(["si-defects", "alloys", "fcc-defects"]))
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
    callback=_key_values,
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
def generate_cmd(ctx, recipe, db, n, options, reference, val, test, seed, workers):
    """Generate relaxation trajectories into DB with RECIPE and assign train/val/test
    splits. si-defects: 64-site diamond silicon with one point defect, relaxed with
    Stillinger-Weber (needs matscipy); alloys: binary fcc alloys with ASE's EMT."""
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.generate import generate
    from ase_bptt.data.recipes import RECIPES

    try:
        RECIPES[recipe].options(options)
    except ValueError as exc:
        raise click.BadParameter(_one_line(exc), param_hint="--option") from None
    splits = _split_fractions(val, test, seed)
    database = TrajectoryDB(db, create=True)
    added = generate(
        recipe,
        database,
        n=n,
        seed=seed,
        workers=workers,
        progress=_progress(ctx),
        reference=reference,
        splits=splits,
        **options,
    )
    click.echo(f"added {added} trajectories to {db}")
    click.echo(database.summary())


@_command(
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
@runtime_options(device=False, dtype=False, seed=True)
@click.pass_context
def import_cmd(ctx, paths, db, label, label_key, group_key, val, test, seed):
    """Import every relaxation found in PATHS (files or directories, one relaxation per
    file) into --db, skipping (and listing) the invalid ones, and assign splits in the
    same transaction. Exits with status 1 when nothing was added and something was skipped."""
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.ingest import import_paths

    splits = _split_fractions(val, test, seed)
    new = "://" not in db and not Path(db).exists()
    database = TrajectoryDB(db, create=True)
    report = import_paths(list(paths), database, label=label, label_key=label_key, group_key=group_key, splits=splits)
    click.echo(str(report))
    if not report.added and report.skipped:
        if new:  # leave no empty database behind
            Path(db).unlink(missing_ok=True)
        raise click.ClickException(
            f"nothing imported into {db}: every input was skipped ({len(report.skipped)}, reasons above)"
        )
    click.echo(database.summary())


@_command(
    cli,
    "info",
    example="ase-bptt info si.pt",
    short_help="Describe a database (splits, labels) or a checkpoint (model, step rule, history).",
)
@click.argument("path")
def info_cmd(path):
    """Describe PATH: an ase-bptt trajectory database or an ase-bptt checkpoint
    (detected from the file's content)."""
    from ase_bptt.train.info import describe

    click.echo(describe(path))


# ---------------------------------------------------------------- training
@_command(
    cli,
    "pretrain",
    example="ase-bptt pretrain traj.db -o pretrained.pt --epochs 50",
    short_help="Force (and energy) matching on the frames of the train split.",
)
@training_options(
    init_help="Continue from this checkpoint instead of a fresh ADAPT model.",
    epochs_help="Passes over the train frames  [default: 50]",
    batch_help="Frames per optimiser step  [default: 16]",
    lr_help="Peak learning rate  [default: 1e-3]",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=None,
    help="Early stopping after this many epochs without a better val force MAE  [default: 10]",
)
@click.option("--augment/--no-augment", default=None, help="Random rotations and translations of the frames.")
@click.option("--d-model", type=click.IntRange(min=1), default=None, help="ADAPT token width  [default: 64]")
@click.option("--n-layers", type=click.IntRange(min=1), default=None, help="ADAPT encoder blocks  [default: 3]")
@click.option("--n-heads", type=click.IntRange(min=1), default=None, help="ADAPT attention heads  [default: 4]")
def pretrain_cmd(
    ctx,
    db,
    out,
    init,
    epochs,
    time_budget,
    batch_size,
    lr,
    patience,
    augment,
    d_model,
    n_layers,
    n_heads,
    overwrite,
    device,
    dtype,
    seed,
):
    """Pretrain an ADAPT force model on DB's train split (early stopping on val).
    Running the same command again resumes an interrupted run."""
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    model = _given(d_model=d_model, d_ff=None if d_model is None else 2 * d_model, n_layers=n_layers, n_heads=n_heads)
    config = _config(
        PretrainConfig,
        model=model or None,
        epochs=epochs,
        time_budget=time_budget,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        augment_rotation=augment,
        augment_translation=augment,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    path = pretrain(db, out, config=config, init=init, progress=_progress(ctx), overwrite=overwrite)
    click.echo(f"wrote {path}")


@_command(
    cli,
    "finetune",
    example="ase-bptt finetune traj.db -o si.pt --init pretrained.pt --epochs 5",
    short_help="BPTT fine-tuning through whole relaxations (pretrains first without --init).",
)
@training_options(
    init_help="Pretrained checkpoint to start from  [default: pretrain first, into <out>-pretrained.pt]",
    epochs_help="Epochs of BPTT  [default: 5]",
    batch_help="Trajectories per step  [default: 4]",
    lr_help="Learning rate  [default: 1e-3]",
)
@click.option(
    "--step",
    type=_StepRuleChoice(),
    default=None,
    help="Step rule of the unrolled relaxation  [default: fixed]",
)
@click.option(
    "--eta",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Step size in A^2/eV (initial value for learned/decoder)  [default: grid search on the train split]",
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Momentum weight w of the update (the paper used 0.05)  [default: 0]",
)
@click.option(
    "--anneal",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Step annealing factor per frame (the paper used 0.99)  [default: 1]",
)
@click.option(
    "--noise", type=click.FloatRange(min=0), default=None, help="Exploration noise on each update (A)  [default: 0]"
)
@click.option(
    "--stopping",
    type=click.Choice(["fixed", "variable"]),
    default=None,
    help="fixed: --tol/--max-steps; variable: drawn per batch (tol in [1e-4, 1e-2], 50-75 frames)",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="RMS displacement that stops a rollout (A)  [default: 1e-3]",
)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Most frames per rollout  [default: 75]")
@click.option(
    "--loss",
    type=click.Choice(["dq", "mse"]),
    default=None,
    help="dq (mass-weighted, defects) or mse (pure crystals)  [default: dq]",
)
@click.option(
    "--proximal",
    type=click.FloatRange(min=0),
    default=None,
    help="Weight of an L2 term to the pretrained weights (an alternative to clipping)  [default: 0]",
)
@click.option("--checkpoint-frames", is_flag=True, default=None, help="Recompute frames in backward (less memory).")
def finetune_cmd(
    ctx,
    db,
    out,
    init,
    step,
    eta,
    momentum,
    anneal,
    noise,
    stopping,
    tol,
    max_steps,
    loss,
    epochs,
    time_budget,
    batch_size,
    lr,
    proximal,
    checkpoint_frames,
    overwrite,
    device,
    dtype,
    seed,
):
    """Fine-tune a model by BPTT on DB's train split: roll out relaxations from the
    initial structures, score the final structure against the relaxed reference
    (Dq), backpropagate through every frame. Keeps the best model by val Dq and
    stores its step rule in the checkpoint. Running the same command again
    resumes an interrupted run."""
    from ase_bptt.train.finetune import FinetuneConfig, finetune

    if step == "fire" and (eta is not None or momentum or (anneal is not None and anneal != 1)):
        raise click.BadParameter(
            "FIRE adapts its own time step; drop --eta, --momentum and --anneal", param_hint="--step"
        )
    config = _config(
        FinetuneConfig,
        step=step,
        eta=eta,
        momentum=momentum,
        anneal=anneal,
        noise=noise,
        stopping=stopping,
        tol=tol,
        max_steps=max_steps,
        loss=loss,
        epochs=epochs,
        time_budget=time_budget,
        batch_size=batch_size,
        lr=lr,
        proximal=proximal,
        checkpoint_frames=checkpoint_frames,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    path = finetune(db, out, init=init, config=config, progress=_progress(ctx), overwrite=overwrite)
    click.echo(f"wrote {path}")


def _baselines(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Any]:
    """Each --baseline as a calculator factory, so a wrong one fails before anything runs."""
    from ase_bptt.train.baselines import BaselineError, parse_baseline

    try:
        return [parse_baseline(v) for v in value]
    except BaselineError as exc:
        raise click.BadParameter(_one_line(exc)) from None


def _config(cls: type, **values: Any) -> Any:
    """Build a training config from the given options; its own checks become usage errors."""
    try:
        return cls(**_given(**values))
    except (ValueError, TypeError) as exc:
        raise click.UsageError(_one_line(exc)) from None


def _given(**values: Any) -> dict[str, Any]:
    """Only the options the user gave, so the config's own defaults apply otherwise."""
    return {k: v for k, v in values.items() if v is not None}


@_command(
    cli,
    "evaluate",
    example="ase-bptt evaluate pretrained.pt si.pt --db traj.db -o report/",
    short_help="Dq of ASE FIRE, fixed steps and each model's own step rule; writes a report.",
)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--db", "db", required=True, type=click.Path(), help="Trajectory database.")
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for report.md, report.json and the plots.",
)
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True, help="Split to score."
)
@click.option(
    "--select-eta-on",
    type=click.Choice(["train", "val", "none"]),
    default="val",
    show_default=True,
    help="Split on which the honest fixed-step eta is chosen.",
)
@click.option(
    "--eta-grid",
    callback=_float_list,
    default=None,
    metavar="ETA,ETA,...",
    help="Fixed step sizes to try (A^2/eV)  [default: 10 values from 0.005 to 0.3, log-spaced]",
)
@click.option(
    "--fire-fmax",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="ASE FIRE force criterion (eV/A).",
)
@click.option("--fire-steps", type=click.IntRange(min=1), default=300, show_default=True, help="ASE FIRE step limit.")
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="Fixed-step stopping tolerance: RMS displacement of one frame (A).",
)
@click.option("--max-steps", type=click.IntRange(min=1), default=75, show_default=True, help="Fixed-step frame limit.")
@click.option(
    "--metric",
    type=click.Choice(["dq", "mse"]),
    default="dq",
    show_default=True,
    help="Dq (mass-weighted) or MSE (pure crystals).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Structures per rollout batch."
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    callback=_baselines,
    metavar="NAME|MODULE:CLASS[,KEY=VALUE...]",
    help="Also relax with ASE FIRE and this ASE calculator (repeatable): sw, tersoff, emt, chgnet "
    "(pip install ase-bptt[chgnet]) or module:Class, e.g. --baseline chgnet --baseline emt.",
)
@click.option(
    "--basin-rms",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="RMS per-atom distance to the reference (A) within which a structure counts as in the right basin.",
)
@runtime_options()
@click.pass_context
def evaluate_cmd(
    ctx,
    checkpoints,
    db,
    out_dir,
    split,
    select_eta_on,
    eta_grid,
    fire_fmax,
    fire_steps,
    tol,
    max_steps,
    metric,
    batch_size,
    baselines,
    basin_rms,
    device,
    dtype,
):
    """Evaluate CHECKPOINTS on a split of --db and write report.md, report.json and PNG plots.
    Structures with an element a checkpoint never saw are listed in the report, not scored."""
    from ase_bptt.train.evaluate import evaluate
    from ase_bptt.train.report import summary_text

    result = evaluate(
        list(checkpoints),
        db,
        out_dir,
        split=split,
        select_eta_on=None if select_eta_on == "none" else select_eta_on,
        eta_grid=eta_grid,
        fire_fmax=fire_fmax,
        fire_steps=fire_steps,
        tol=tol,
        max_steps=max_steps,
        metric=metric,
        batch_size=batch_size,
        baselines=baselines,
        basin_rms=basin_rms,
        device=device,
        dtype=dtype,
        progress=_progress(ctx),
    )
    click.echo(summary_text(result))
    click.echo(f"report: {Path(out_dir) / 'report.md'}")


# ------------------------------------------------------------------- using
@_command(
    cli,
    "relax",
    example="ase-bptt relax POSCAR --model si.pt -o CONTCAR",
    short_help="Relax every structure in a file (any ase.io format in and out).",
)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--model", "-m", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option(
    "--optimizer",
    type=click.Choice(["learned", "fire"]),
    default="learned",
    show_default=True,
    help="learned: the checkpoint's own step rule, as trained; fire: ase.optimize.FIRE to --fmax.",
)
@click.option(
    "--fmax",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="FIRE force criterion (eV/A).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Step limit  [default: the checkpoint's max_steps (learned) or 300 (fire)]",
)
@click.option("--input-format", default=None, help="ase.io format of INPUT (default: from the name).")
@click.option(
    "--output-format",
    "--format",
    "output_format",
    default=None,
    help="ase.io format of the output, e.g. extxyz, traj, vasp, cif (default: from the name).",
)
@runtime_options()
@click.pass_context
def relax_cmd(ctx, input_path, model, output, optimizer, fmax, steps, input_format, output_format, device, dtype):
    """Relax every frame of INPUT with a fine-tuned model and write the relaxed
    structures (with energies and forces) to --output."""
    import warnings

    from ase_bptt.train.relax_files import relax_file

    with warnings.catch_warnings():
        # An input outside the model's training domain: one "Warning: ..." line, not a source listing.
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"Warning: {message}", err=True)
        done = relax_file(
            input_path,
            output,
            model=model,
            optimizer=optimizer,
            fmax=fmax,
            steps=steps,
            input_format=input_format,
            output_format=output_format,
            device=device,
            dtype=dtype,
            progress=_progress(ctx),
        )
    for r in done:
        state = "converged" if r.converged else "not converged"
        click.echo(
            f"{r.index:4d} {r.formula:>12s}  {r.steps:4d} steps  {state:13s}  fmax {r.fmax:.3f} eV/A  "
            f"moved {r.displacement_rms:.3f} A rms"
        )
    click.echo(f"wrote {len(done)} structure(s) to {output}")


@_command(
    cli,
    "demo",
    example="ase-bptt demo --quick --out demo-out",
    short_help="The whole pipeline on built-in silicon defects, ending with the Dq table.",
)
@click.option("--quick", is_flag=True, help="A smoke run of every stage instead of the full demo (docs/demo.md).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="demo-out",
    show_default=True,
    help="Working directory; a re-run reuses what is already there.",
)
@runtime_options(seed=True, workers=True)
@click.pass_context
def demo_cmd(ctx, quick, out_dir, device, dtype, seed, workers):
    """Generate silicon point-defect relaxations, pretrain, fine-tune by BPTT,
    evaluate on the test split and print the Dq table with the report's path."""
    from ase_bptt.train.demo import run_demo

    run_demo(
        out_dir,
        quick=quick,
        device=device,
        dtype=dtype,
        seed=seed,
        workers=workers,
        progress=_progress(ctx),
        echo=click.echo,
    )


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``ase-bptt``)."""
    return cli.main(args=argv, prog_name="ase-bptt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

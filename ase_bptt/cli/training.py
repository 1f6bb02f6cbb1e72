"""``ase-bptt pretrain``, ``finetune`` and ``evaluate``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ase_bptt.cli._group import cli, command, one_line
from ase_bptt.cli.config_options import config_params, recipe_config
from ase_bptt.cli.options import (
    architecture_params,
    augment_params,
    baseline_specs,
    float_list,
    model_changes,
    parse_candidates,
    parse_label_weights,
    progress_enabled,
    recipe_params,
    runtime_options,
    training_options,
)
from ase_bptt.metrics import CORRECT_BASIN_RMS
from ase_bptt.relax.defaults import (
    DEFAULT_FIRE_STEPS,
    DEFAULT_FMAX,
    DEFAULT_MAX_STEPS,
    DEFAULT_TOL,
    EVAL_BATCH_SIZE,
    REFINE_OPTIMIZERS,
    REFINE_STEPS,
)

# ---------------------------------------------------------------- training
_PRETRAIN_FIELDS = ("max_steps", "epochs", "time_budget", "batch_size", "lr", "patience")
_FINETUNE_FIELDS = (
    "step",
    "eta",
    "momentum",
    "anneal",
    "noise",
    "stopping",
    "tol",
    "max_steps",
    "loss",
    "max_batches",
    "epochs",
    "time_budget",
    "batch_size",
    "lr",
    "proximal",
    "freeze",
    "force_weight",
    "energy_weight",
    "force_frames",
    "checkpoint_frames",
    "eval_every",
    "patience",
    "lr_schedule",
    "warmup",
    "export",
    "refit_energy",
)


def _pretrain_params() -> list[click.Parameter]:
    from ase_bptt.train.pretrain import PretrainConfig

    return [
        *recipe_params(),
        *config_params(PretrainConfig, *_PRETRAIN_FIELDS),
        *architecture_params(),
        *augment_params("Random rotations and translations of the frames."),
    ]


@command(
    cli,
    "pretrain",
    example="ase-bptt pretrain traj.db -o pretrained.pt",
    short_help="Force (and energy) matching on the frames of the train split.",
    params=_pretrain_params,
)
@training_options(
    init_help="Continue from this checkpoint, or start from a universal MLIP's shipped weights by name (e.g. chgnet, "
    "or chgnet:0.3.0), instead of a fresh model."
)
def pretrain_cmd(
    ctx, db, out, init, overwrite, workers, recipe, architecture, d_model, n_layers, n_heads, augment, **options
):
    """Pretrain a force model on DB's train split (the default recipe: ADAPT-MI, about
    five passes over the frames; early stopping on val only with --patience).
    Running the same command again resumes an interrupted run."""
    from ase_bptt.train.launch import default_workers
    from ase_bptt.train.presets import pretrain_config
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    config = recipe_config(
        pretrain_config,
        PretrainConfig,
        recipe=recipe_for(ctx, recipe, init),
        model=model_changes(architecture, d_model, n_layers, n_heads) or None,
        augment_rotation=augment,
        augment_translation=augment,
        **options,
    )
    workers = workers or default_workers(config.device)
    path = pretrain(
        db, out, config=config, init=init, progress=progress_enabled(ctx), overwrite=overwrite, workers=workers
    )
    click.echo(f"wrote {path}")


def recipe_for(ctx: click.Context, recipe: str, init: str | None) -> str:
    """The recipe the given options go on top of: ``universal`` when ``--init`` starts from a universal MLIP and
    ``--recipe`` was not given, so an option given with the default recipe's value (``--lr 5e-4``) stays the
    user's instead of being taken for an untouched default."""
    from click.core import ParameterSource

    from ase_bptt.train.pretrain import starts_universal

    if ctx.get_parameter_source("recipe") is ParameterSource.DEFAULT and starts_universal(init):
        logging.getLogger("ase_bptt.train").info(
            "starting from a universal MLIP: the universal recipe (--recipe default keeps the default one)"
        )
        return "universal"
    return recipe


def _finetune_params() -> list[click.Parameter]:
    from ase_bptt.train.finetune_config import FinetuneConfig
    from ase_bptt.train.pretrain import PretrainConfig

    return [
        *recipe_params(),
        *config_params(FinetuneConfig, *_FINETUNE_FIELDS),
        click.Option(
            ["--label-weight", "label_weights"],
            multiple=True,
            callback=parse_label_weights,
            metavar="LABEL=W",
            help="Weight of the Dq of train structures with this label or fnmatch pattern, e.g. 'int:*=3' "
            "(repeatable; like MACE's config_type_weights; scaled to mean 1)  [default: all 1]",
        ),
        click.Option(
            ["--candidate", "candidates"],
            multiple=True,
            callback=parse_candidates,
            metavar="FIELD=V1,V2",
            help="Race these values of a setting on val, e.g. --candidate lr=5e-4,1e-3 (repeatable: every "
            "combination): each trained to its budget from the same pretrained model, side by side on --workers "
            "processes, the best exported model kept  [default: none]",
        ),
        *augment_params(
            "Random rigid shifts (periodic cells) and cube symmetries (cubic cells) of the train structures, "
            "initial and relaxed together"
        ),
        *config_params(PretrainConfig, "max_steps", nested="pretrain", flags={"max_steps": "--pretrain-steps"}),
        *architecture_params(when="when it pretrains"),
    ]


@command(
    cli,
    "finetune",
    example="ase-bptt finetune traj.db -o model.pt",
    short_help="BPTT fine-tuning through whole relaxations (pretrains first without --init).",
    params=_finetune_params,
)
@training_options(
    init_help="Model to start from: a pretrained checkpoint, or a universal MLIP by name (e.g. chgnet)  "
    "[default: pretrain first, into <out>-pretrained.pt]"
)
def finetune_cmd(
    ctx,
    db,
    out,
    init,
    overwrite,
    workers,
    recipe,
    label_weights,
    augment,
    architecture,
    d_model,
    n_layers,
    n_heads,
    **options,
):
    """Fine-tune a model by BPTT on DB's train split: roll out relaxations from the
    initial structures, score the final structure against the relaxed reference
    (Dq), backpropagate through every frame. With no options this is the default
    recipe: it pretrains first, chooses the learning rate and how the tuned model
    relaxes on val, and keeps the best model by val Dq. Running the same command
    again resumes an interrupted run."""
    from ase_bptt.train.finetune import finetune
    from ase_bptt.train.finetune_config import FinetuneConfig
    from ase_bptt.train.launch import default_workers
    from ase_bptt.train.presets import finetune_config

    step, eta, momentum, anneal = (options.get(k) for k in ("step", "eta", "momentum", "anneal"))
    if step == "fire" and (eta is not None or momentum or (anneal is not None and anneal != 1)):
        raise click.BadParameter(
            "FIRE adapts its own time step; drop --eta, --momentum and --anneal", param_hint="--step"
        )
    options["pretrain__model"] = model_changes(architecture, d_model, n_layers, n_heads) or None
    config = recipe_config(
        finetune_config,
        FinetuneConfig,
        recipe=recipe_for(ctx, recipe, init),
        label_weights=label_weights,
        augment_translation=augment,
        augment_cubic=augment,
        **options,
    )
    workers = workers or default_workers(config.device)
    path = finetune(
        db, out, init=init, config=config, progress=progress_enabled(ctx), overwrite=overwrite, workers=workers
    )
    click.echo(f"wrote {path}")


@command(
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
    callback=float_list,
    default=None,
    metavar="ETA,ETA,...",
    help="Fixed step sizes to try (A^2/eV)  [default: 10 values from 0.005 to 0.3, log-spaced; 4 from 0.00788 to "
    "0.121 when a checkpoint holds a universal MLIP]",
)
@click.option(
    "--fire-fmax",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_FMAX,
    show_default=True,
    help="ASE FIRE force criterion (eV/A).",
)
@click.option(
    "--fire-steps",
    type=click.IntRange(min=1),
    default=DEFAULT_FIRE_STEPS,
    show_default=True,
    help="ASE FIRE step limit.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TOL,
    show_default=True,
    help="Fixed-step stopping tolerance: RMS displacement of one frame (A).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_STEPS,
    show_default=True,
    help="Fixed-step frame limit.",
)
@click.option(
    "--metric",
    type=click.Choice(["dq", "mse"]),
    default="dq",
    show_default=True,
    help="Dq (mass-weighted) or MSE (pure crystals).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=EVAL_BATCH_SIZE,
    show_default=True,
    help="Structures per rollout batch.",
)
@click.option(
    "--baseline",
    "baselines",
    multiple=True,
    callback=baseline_specs,
    metavar="NAME|MODULE:CLASS[,KEY=VALUE...]",
    help="Also relax with ASE FIRE and this ASE calculator (repeatable): sw, tersoff, emt, chgnet "
    "(pip install ase-bptt[chgnet]) or module:Class, e.g. --baseline chgnet --baseline emt.",
)
@click.option(
    "--basin-rms",
    type=click.FloatRange(min=0, min_open=True),
    default=CORRECT_BASIN_RMS,
    show_default=True,
    help="RMS per-atom distance to the reference (A) within which a structure counts as in the right basin.",
)
@click.option(
    "--refine-with",
    "refine_with",
    default=None,
    metavar="NAME|MODULE:CLASS[,KEY=VALUE...]",
    help="Refine every method's final structures with this reference calculator (same forms as --baseline) and "
    "report the steps it still needed: what a pre-relaxation saves your DFT.",
)
@click.option(
    "--refine-optimizer",
    type=click.Choice(list(REFINE_OPTIMIZERS)),
    default="FIRE",
    show_default=True,
    help="ASE optimizer of the refinement.",
)
@click.option(
    "--refine-fmax",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_FMAX,
    show_default=True,
    help="Force criterion of the refinement (eV/A).",
)
@click.option(
    "--refine-steps", type=click.IntRange(min=1), default=REFINE_STEPS, show_default=True, help="Refinement step limit."
)
@click.option(
    "--plots/--no-plots",
    default=True,
    show_default=True,
    help="Draw the PNG plots (--no-plots: report.md and report.json only; the plots are most of a small run's time).",
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
    refine_with,
    refine_optimizer,
    refine_fmax,
    refine_steps,
    plots,
    device,
    dtype,
):
    """Evaluate CHECKPOINTS on a split of --db and write report.md, report.json and PNG plots.
    Structures with an element a checkpoint never saw are listed in the report, not scored."""
    from ase_bptt.evaluation.baselines import BaselineError
    from ase_bptt.evaluation.compare import worse_label_lines
    from ase_bptt.evaluation.pipeline import evaluate
    from ase_bptt.evaluation.refine import RefineError, parse_refinement
    from ase_bptt.evaluation.report import summary_text

    refinement = None
    if refine_with is not None:
        try:
            refinement = parse_refinement(refine_with, optimizer=refine_optimizer, fmax=refine_fmax, steps=refine_steps)
        except (RefineError, BaselineError) as exc:
            raise click.BadParameter(one_line(exc)) from None
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
        refinement=refinement,
        device=device,
        dtype=dtype,
        progress=progress_enabled(ctx),
        plots=plots,
    )
    click.echo(summary_text(result))
    for line in worse_label_lines(result):
        click.echo(line, err=True)
    click.echo(f"report: {Path(out_dir) / 'report.md'}")

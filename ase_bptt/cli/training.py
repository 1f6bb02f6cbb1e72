"""``ase-bptt pretrain``, ``finetune`` and ``evaluate``."""

from __future__ import annotations

from pathlib import Path

import click

from ase_bptt.cli._group import cli, command
from ase_bptt.cli.options import (
    RegistryChoice,
    baseline_specs,
    config_from,
    float_list,
    given_options,
    parse_label_weights,
    progress_enabled,
    runtime_options,
    step_rule_names,
    training_options,
)


# ---------------------------------------------------------------- training
@command(
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
@click.option(
    "--model",
    "architecture",
    type=click.Choice(["adapt", "adapt-mi"]),
    default=None,
    help="adapt: the paper's ADAPT; adapt-mi: its translation-invariant variant (minimum-image pair "
    "attention, docs/model.md)  [default: adapt]",
)
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
    architecture,
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

    model = given_options(
        model_name=architecture,
        d_model=d_model,
        d_ff=None if d_model is None else 2 * d_model,
        n_layers=n_layers,
        n_heads=n_heads,
    )
    config = config_from(
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
    path = pretrain(db, out, config=config, init=init, progress=progress_enabled(ctx), overwrite=overwrite)
    click.echo(f"wrote {path}")


@command(
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
    type=RegistryChoice(step_rule_names),
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
@click.option(
    "--freeze",
    multiple=True,
    metavar="PREFIX",
    help="Keep the parameters whose names start with PREFIX at their initial values, e.g. --freeze embed "
    "--freeze blocks to tune only the readout (repeatable; names as in model.named_parameters())  "
    "[default: tune all]",
)
@click.option(
    "--force-weight",
    type=click.FloatRange(min=0),
    default=None,
    help="Weight of a force-matching term (mean squared force error on train frames, amu^1/2 A per (eV/A)^2) "
    "added to the BPTT loss; keeps the tuned model a usable force field  [default: 0 = off]",
)
@click.option(
    "--energy-weight",
    type=click.FloatRange(min=0),
    default=None,
    help="Weight of an energy-matching term (mean squared per-atom energy error on the force term's frames, "
    "amu^1/2 A per (eV/atom)^2; needs reference energies); keeps the tuned model's energies usable  "
    "[default: 0 = off]",
)
@click.option(
    "--label-weight",
    "label_weights",
    multiple=True,
    callback=parse_label_weights,
    metavar="LABEL=W",
    help="Weight of the Dq of train structures with this label or fnmatch pattern, e.g. 'int:*=3' "
    "(repeatable; like MACE's config_type_weights; scaled to mean 1)  [default: all 1]",
)
@click.option(
    "--force-frames",
    type=click.IntRange(min=1),
    default=None,
    help="Train frames drawn per optimiser step for the force term  [default: 16]",
)
@click.option("--checkpoint-frames", is_flag=True, default=None, help="Recompute frames in backward (less memory).")
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=None,
    metavar="STEPS",
    help="Optimiser steps between val evaluations  [default: once per epoch]",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=None,
    help="Early stopping after this many evaluations without a better val Dq  [default: off]",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine", "onecycle"]),
    default=None,
    help="Learning-rate schedule over the run's optimiser steps  [default: constant]",
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=None, metavar="STEPS", help="Warmup optimiser steps  [default: 0]"
)
@click.option(
    "--augment/--no-augment",
    default=None,
    help="Random rigid shifts (periodic cells) and cube symmetries (cubic cells) of the train structures, "
    "initial and relaxed together  [default: no-augment]",
)
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
    freeze,
    force_weight,
    energy_weight,
    label_weights,
    force_frames,
    checkpoint_frames,
    eval_every,
    patience,
    lr_schedule,
    warmup,
    augment,
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
    config = config_from(
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
        freeze=freeze or None,
        force_weight=force_weight,
        energy_weight=energy_weight,
        label_weights=label_weights,
        force_frames=force_frames,
        checkpoint_frames=checkpoint_frames,
        eval_every=eval_every,
        patience=patience,
        lr_schedule=lr_schedule,
        warmup=warmup,
        augment_translation=augment,
        augment_cubic=augment,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    path = finetune(db, out, init=init, config=config, progress=progress_enabled(ctx), overwrite=overwrite)
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
    callback=baseline_specs,
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
    plots,
    device,
    dtype,
):
    """Evaluate CHECKPOINTS on a split of --db and write report.md, report.json and PNG plots.
    Structures with an element a checkpoint never saw are listed in the report, not scored."""
    from ase_bptt.train.evaluate import evaluate
    from ase_bptt.train.report import summary_text
    from ase_bptt.train.worse_labels import worse_label_lines

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
        progress=progress_enabled(ctx),
        plots=plots,
    )
    click.echo(summary_text(result))
    for line in worse_label_lines(result):
        click.echo(line, err=True)
    click.echo(f"report: {Path(out_dir) / 'report.md'}")

"""``ase-bptt relax`` and ``demo``: using a tuned model, and the whole pipeline on built-in data."""

from __future__ import annotations

import os

import click

from ase_bptt.cli._group import cli, command
from ase_bptt.cli.options import progress_enabled, runtime_options
from ase_bptt.relax.defaults import DEFAULT_FIRE_STEPS, DEFAULT_FMAX


# ------------------------------------------------------------------- using
@command(
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
    default=DEFAULT_FMAX,
    show_default=True,
    help="FIRE force criterion (eV/A).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help=f"Step limit  [default: the checkpoint's max_steps (learned) or {DEFAULT_FIRE_STEPS} (fire)]",
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

    from ase_bptt.workflows.relax_files import relax_file

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
            progress=progress_enabled(ctx),
        )
    for r in done:
        state = "converged" if r.converged else "not converged"
        click.echo(
            f"{r.index:4d} {r.formula:>12s}  {r.steps:4d} steps  {state:13s}  fmax {r.fmax:.3f} eV/A  "
            f"moved {r.displacement_rms:.3f} A rms"
        )
    click.echo(f"wrote {len(done)} structure(s) to {output}")


@command(
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
@runtime_options(
    seed=True,
    workers=True,
    workers_help="Parallel worker processes for the reference relaxations  [default: CPUs, at most 2]",
)
@click.pass_context
def demo_cmd(ctx, quick, out_dir, device, dtype, seed, workers):
    """Generate silicon point-defect relaxations, pretrain, fine-tune by BPTT,
    evaluate on the test split and print the Dq table with the report's path."""
    from ase_bptt.workflows.demo import run_demo

    if ctx.get_parameter_source("workers") is click.core.ParameterSource.DEFAULT:
        workers = min(2, os.cpu_count() or 1)  # the reference relaxations are independent: use both cores
    run_demo(
        out_dir,
        quick=quick,
        device=device,
        dtype=dtype,
        seed=seed,
        workers=workers,
        progress=progress_enabled(ctx),
        echo=click.echo,
    )

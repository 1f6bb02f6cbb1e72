"""Options and option callbacks shared by several ``ase-bptt`` commands."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from ase_bptt.cli._group import one_line

__all__ = [
    "RegistryChoice",
    "step_rule_names",
    "recipe_names",
    "check_device",
    "set_threads",
    "runtime_options",
    "training_options",
    "recipe_params",
    "architecture_params",
    "model_changes",
    "augment_params",
    "progress_enabled",
    "float_list",
    "key_values",
    "parse_label_weights",
    "parse_candidates",
    "split_options",
    "declared_split_option",
    "refuse_with_declared",
    "split_fractions",
    "baseline_specs",
    "given_options",
]


class RegistryChoice(click.Choice):
    """The names of a registry (step rules, recipes), read when first needed: importing a
    registry loads torch or ase, and ``--help`` should not."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns; the registry is the source
        pass


def step_rule_names() -> tuple[str, ...]:
    from ase_bptt.relax.registry import step_rule_names as names

    return names()


def recipe_names() -> tuple[str, ...]:
    from ase_bptt.data.recipes import RECIPES

    return tuple(RECIPES)


# ----------------------------------------------------------- shared options
def check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from ase_bptt.runs.distributed import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def set_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Apply ``--threads`` as the option is parsed, before the command loads any model."""
    import torch

    torch.set_num_threads(value)
    return value


def runtime_options(
    *,
    device: bool = True,
    dtype: bool = True,
    seed: bool = False,
    workers: bool = False,
    workers_help: str | None = None,
) -> Callable:
    """The shared ``--device`` (with ``--threads``), ``--dtype``, ``--seed`` and ``--workers`` options, where
    they apply."""

    def deco(f: Callable) -> Callable:
        opts = []
        if device:
            opts.append(
                click.option(
                    "--device",
                    default=None,
                    callback=check_device,
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
        if device:
            opts.append(
                click.option(
                    "--threads",
                    type=click.IntRange(min=1),
                    default=1,
                    show_default=True,
                    callback=set_threads,
                    expose_value=False,
                    help="Torch CPU threads of this process. One, because the default model's tensors are too "
                    "small to share: on 2 cores its pretraining took 184 CPU-s on one thread, 599 on two.",
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
                    show_default=workers_help is None,
                    help=workers_help or "Parallel worker processes.",
                )
            )
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def training_options(*, init_help: str) -> Callable:
    """The arguments ``pretrain`` and ``finetune`` share: DB, --out, --init, --overwrite, --workers and the
    runtime options (the command's context comes first); their training options come from the configs
    (:func:`config_params`)."""
    shared = [
        click.argument("db", type=click.Path()),
        click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write."),
        click.option("--init", type=click.Path(dir_okay=False), default=None, help=init_help),
        click.option("--overwrite", is_flag=True, help="Replace an --out made with other settings or data."),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=None,
            help="CPU processes sharing the training (torch.distributed, one torch thread each; about half the "
            "wall time on 2 cores), or running the candidates raced on val side by side  [default: the CPU's "
            "cores, at most 2; 1 on a GPU]",
        ),
        runtime_options(seed=True),
    ]

    def deco(f: Callable) -> Callable:
        for opt in reversed(shared):
            f = opt(f)
        return click.pass_context(f)

    return deco


def recipe_params() -> list[click.Parameter]:
    """``--recipe NAME``: the training recipe the other options change (ase_bptt.train.presets)."""
    from ase_bptt.train.presets import TRAINING_RECIPES

    lines = "; ".join(f"{r.name}: {r.summary}" for r in TRAINING_RECIPES.values())
    return [
        click.Option(
            ["--recipe"],
            type=click.Choice(tuple(TRAINING_RECIPES)),
            default="default",
            show_default=True,
            help=f"Named training recipe whose settings the other options change ({lines}).",
        )
    ]


def architecture_params(when: str = "") -> list[click.Parameter]:
    """``--architecture``, ``--d-model``, ``--n-layers``, ``--n-heads`` of a fresh model (defaults: the
    default recipe's model, ``pretrain.DEFAULT_MODEL``)."""
    from ase_bptt.train.pretrain import ARCHITECTURES, DEFAULT_MODEL

    suffix = f" ({when})" if when else ""
    return [
        click.Option(
            ["--architecture"],
            type=click.Choice(tuple(ARCHITECTURES)),
            default=None,
            help="Model architecture: adapt-mi, translation invariant (pair attention over every periodic image "
            f"within its cutoff); adapt, the paper's ADAPT (docs/model.md){suffix}  "
            f"[default: {DEFAULT_MODEL['model_name']}]",
        ),
        click.Option(
            ["--d-model"],
            type=click.IntRange(min=1),
            default=None,
            help=f"Token width (the feed-forward width is twice it){suffix}  [default: {DEFAULT_MODEL['d_model']}]",
        ),
        click.Option(
            ["--n-layers"],
            type=click.IntRange(min=1),
            default=None,
            help=f"Encoder blocks{suffix}  [default: {DEFAULT_MODEL['n_layers']}]",
        ),
        click.Option(
            ["--n-heads"],
            type=click.IntRange(min=1),
            default=None,
            help=f"Attention heads{suffix}  [default: {DEFAULT_MODEL['n_heads']}]",
        ),
    ]


def model_changes(architecture: str | None, d_model: int | None, n_layers: int | None, n_heads: int | None) -> dict:
    """The model dict changes of :func:`architecture_params` (empty when none was given)."""
    return given_options(
        model_name=architecture,
        d_model=d_model,
        d_ff=None if d_model is None else 2 * d_model,
        n_layers=n_layers,
        n_heads=n_heads,
    )


def augment_params(text: str) -> list[click.Parameter]:
    """``--augment/--no-augment``: the augmentations of a training (one switch for the config's two)."""
    return [click.Option(["--augment/--no-augment"], default=None, help=f"{text}  [default: no-augment]")]


def progress_enabled(ctx: click.Context) -> bool:
    return not ctx.find_root().params.get("quiet", False)


def float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.01,0.02,0.05") from None
    if not values or any(not v > 0 for v in values):
        raise click.BadParameter(f"{value!r}: give positive numbers, e.g. 0.01,0.02,0.05")
    return values


def key_values(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
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


def parse_label_weights(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, float] | None:
    """``('int:*=3', 'sub:Ni=2')`` -> ``{'int:*': 3.0, 'sub:Ni': 2.0}`` (None when not given)."""
    out: dict[str, float] = {}
    for item in value:
        label, sep, raw = item.rpartition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not sep or not label or not (weight >= 0 and weight != float("inf")):
            raise click.BadParameter(f"{item!r} is not LABEL=WEIGHT with a weight >= 0, e.g. 'int:*=3'")
        out[label] = weight
    return out or None


def parse_candidates(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict | None:
    """``('lr=5e-4,1e-3',)`` -> ``{'lr': (0.0005, 0.001)}`` (None when not given); numbers where they parse."""

    def number(text: str) -> Any:
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            return text

    out: dict[str, tuple[Any, ...]] = {}
    for item in value:
        name, sep, raw = item.partition("=")
        values = tuple(number(v) for v in raw.split(",") if v.strip())
        if not sep or not name.isidentifier() or len(values) < 2:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE,VALUE[,...], e.g. --candidate lr=5e-4,1e-3")
        out[name] = values
    return out or None


def split_options(f: Callable) -> Callable:
    """``--val``, ``--test``, ``--hold-out-label`` and ``--hold-out-element``: how trajectories are split."""
    opts = [
        click.option(
            "--val",
            type=click.FloatRange(0, 1, max_open=True),
            default=0.1,
            show_default=True,
            help="Fraction of trajectories for validation (--val + --test < 1).",
        ),
        click.option(
            "--test",
            type=click.FloatRange(0, 1, max_open=True),
            default=None,
            help="Fraction of trajectories for testing (--val + --test < 1); with a hold-out, the fraction of "
            "the other trajectories that join the held-out ones in test  [default: 0.1, or 0 with a hold-out]",
        ),
        click.option(
            "--hold-out-label",
            "hold_out_label",
            multiple=True,
            metavar="LABEL",
            help="Put every trajectory with this label in test (repeatable). Exact label, or a shell pattern: "
            "'sub:Ni*' (prefix), 'int:*'.",
        ),
        click.option(
            "--hold-out-element",
            "hold_out_element",
            multiple=True,
            metavar="SYMBOL",
            help="Put every trajectory containing this element in test (repeatable); it never occurs in train or val.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def declared_split_option(help_text: str) -> Callable:
    """``--split train|val|test``: the split the user declares for named or imported trajectories."""
    return click.option(
        "--split", "declared", type=click.Choice(["train", "val", "test"]), default=None, help=help_text
    )


def refuse_with_declared(ctx: click.Context, *options: str) -> None:
    """A usage error when one of ``options`` was given together with ``--split`` (before anything is opened)."""
    given = [
        o
        for o in options
        if ctx.get_parameter_source(o.lstrip("-").replace("-", "_")) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise click.BadParameter(
            f"--split declares the split itself; drop {' and '.join(given)}", param_hint="'--split'"
        )


def split_fractions(
    val: float,
    test: float | None,
    seed: int,
    hold_out_label: Sequence[str] = (),
    hold_out_element: Sequence[str] = (),
) -> Any:
    """The :class:`SplitFractions` of the :func:`split_options`, checked before any database is opened,
    so a bad value writes nothing."""
    from ase_bptt.data.splits import HoldOut, HoldOutError, SplitFractionError, SplitFractions

    hold_out = []
    for kind, values, hint in (
        ("label", hold_out_label, "--hold-out-label"),
        ("element", hold_out_element, "--hold-out-element"),
    ):
        if values:
            try:
                hold_out.append(HoldOut(kind, tuple(values)))
            except HoldOutError as exc:
                raise click.BadParameter(one_line(exc), param_hint=f"'{hint}'") from None
    test = (0.0 if hold_out else 0.1) if test is None else test
    try:
        return SplitFractions(val=val, test=test, seed=seed, hold_out=tuple(hold_out))
    except SplitFractionError:
        raise click.BadParameter(
            f"--val {val} and --test {test} add up to {val + test:g}; they must leave some for training "
            "(val + test < 1), e.g. --val 0.1 --test 0.1",
            param_hint="'--val' / '--test'",
        ) from None


def baseline_specs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Any]:
    """Each --baseline as a calculator factory, so a wrong one fails before anything runs."""
    from ase_bptt.evaluation.baselines import BaselineError, parse_baseline

    try:
        return [parse_baseline(v) for v in value]
    except BaselineError as exc:
        raise click.BadParameter(one_line(exc)) from None


def given_options(**values: Any) -> dict[str, Any]:
    """Only the options the user gave, so the config's own defaults apply otherwise."""
    return {k: v for k, v in values.items() if v is not None}

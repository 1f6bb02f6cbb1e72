"""Each training option is defined once, by its config field: flag, default and help cannot drift from the code."""

from __future__ import annotations

import dataclasses
import re

import pytest
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.runs.config import AUTO
from ase_bptt.train.finetune_config import FinetuneConfig
from ase_bptt.train.pretrain import DEFAULT_MODEL, PretrainConfig


def options_of(command: str) -> dict[str, str]:
    """``{flag: help text}`` of a command, as ``--help`` shows them (one line each)."""
    ctx = cli.commands[command].make_context(command, ["--help"], resilient_parsing=True)
    out = {}
    for param in cli.commands[command].get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            out[param.opts[0]] = " ".join(record[1].split())
    return out


def shown(text: str) -> str:
    found = re.findall(r"\[default: ([^\]]*)\]", text)
    assert found, text
    return found[-1]


def same_default(value, text: str) -> bool:
    """The default a user reads in --help is the field's value (read back, not rendered the same way)."""
    if value == AUTO:
        return text == AUTO or text.startswith("auto:")
    if value is None:
        return text == "off" or not re.match(r"^[0-9.e+-]+$", text)
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, (int, float)):
        return float(text) == value
    if isinstance(value, tuple):
        return text != "" if not value else text == ",".join(map(str, value))
    return text == value


@pytest.mark.parametrize(
    "command, cls, renamed",
    [
        ("pretrain", PretrainConfig, {"max_steps": "--train-steps"}),
        ("finetune", FinetuneConfig, {"max_batches": "--train-steps"}),
    ],
)
def test_every_config_option_shows_the_dataclass_default(command, cls, renamed):
    helps = options_of(command)
    checked = 0
    for f in dataclasses.fields(cls):
        if "cli" not in f.metadata or f.name == "recipe":
            continue
        flag = renamed.get(f.name, "--" + f.name.replace("_", "-"))
        if flag not in helps:  # a field the command does not offer (e.g. finetune's own --step only)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert same_default(default, shown(helps[flag])), (flag, default, helps[flag])
        checked += 1
    assert checked >= (6 if command == "pretrain" else 24)


def test_model_and_pretraining_options_show_the_default_recipes_values():
    helps = options_of("finetune")
    assert shown(helps["--architecture"]) == DEFAULT_MODEL["model_name"]
    assert int(shown(helps["--d-model"])) == DEFAULT_MODEL["d_model"]
    assert int(shown(helps["--n-layers"])) == DEFAULT_MODEL["n_layers"]
    assert int(shown(helps["--n-heads"])) == DEFAULT_MODEL["n_heads"]
    assert shown(helps["--pretrain-steps"]).startswith("auto:") and PretrainConfig().max_steps == AUTO
    assert shown(helps["--recipe"]) == "default"


def fake(monkeypatch, module: str, name: str) -> dict:
    import importlib

    seen: dict = {}

    def record(db, out, **kwargs):
        seen.update(kwargs)
        return out

    monkeypatch.setattr(importlib.import_module(module), name, record)
    return seen


def test_recipes_and_words_reach_the_config(monkeypatch, tmp_path):
    seen = fake(monkeypatch, "ase_bptt.train.finetune", "finetune")
    db = tmp_path / "x.db"
    run = lambda *a: CliRunner().invoke(cli, ["--quiet", "finetune", str(db), "-o", str(tmp_path / "m.pt"), *a])  # noqa: E731
    assert run("--recipe", "paper", "--lr", "1e-3").exit_code == 0
    c = seen["config"]
    assert (c.recipe, c.step, c.lr, c.force_weight, c.candidates) == ("paper", "fixed", 1e-3, 0.0, {})
    assert run("--train-steps", "off", "--patience", "4", "--tol", "auto", "--eval-every", "off").exit_code == 0
    c = seen["config"]
    assert (c.max_batches, c.patience, c.tol, c.eval_every) == (None, 4, AUTO, None)
    assert run("--pretrain-steps", "500", "--architecture", "adapt", "--d-model", "16", "--seed", "3").exit_code == 0
    c = seen["config"]
    assert (c.pretrain.max_steps, c.seed) == (500, 3)
    assert c.pretrain.model == {"d_model": 16, "d_ff": 32}  # ADAPT: its own defaults, the given width
    assert run("--candidate", "lr=5e-4,1e-3", "--candidate", "force_weight=3,10").exit_code == 0
    assert seen["config"].candidates == {"lr": (5e-4, 1e-3), "force_weight": (3, 10)}
    bad = run("--candidate", "lr=5e-4")
    assert bad.exit_code == 2 and "is not FIELD=VALUE,VALUE" in bad.output
    bad = run("--candidate", "seed=1,2")
    assert bad.exit_code == 2 and "candidates must be keyed by" in bad.output
    bad = run("--lr", "-1")
    assert bad.exit_code == 2 and "Invalid value for '--lr': FinetuneConfig.lr must be positive" in bad.output
    bad = run("--energy-weight", "lots")
    assert bad.exit_code == 2 and "--energy-weight" in bad.output and "lots" in bad.output


def test_pretrain_recipe_and_model_options(monkeypatch, tmp_path):
    seen = fake(monkeypatch, "ase_bptt.train.pretrain", "pretrain")
    args = ["--quiet", "pretrain", str(tmp_path / "x.db"), "-o", str(tmp_path / "p.pt")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert seen["config"].to_dict() == PretrainConfig().to_dict()
    assert CliRunner().invoke(cli, [*args, "--architecture", "adapt-mi", "--n-layers", "3", "--augment"]).exit_code == 0
    c = seen["config"]
    assert c.model == {**DEFAULT_MODEL, "n_layers": 3} and c.augment_rotation and c.augment_translation


def test_evaluate_options_default_to_the_functions_defaults():
    """`ase-bptt evaluate`'s defaults are evaluate()'s and Refinement's, never typed twice."""
    import dataclasses
    import inspect

    from ase_bptt.cli import cli
    from ase_bptt.evaluation.pipeline import evaluate
    from ase_bptt.evaluation.refine import Refinement

    params = {p.name: p.default for p in cli.commands["evaluate"].params}
    signature = inspect.signature(evaluate).parameters
    for name in ("fire_fmax", "fire_steps", "tol", "max_steps", "metric", "batch_size", "basin_rms", "split"):
        assert params[name] == signature[name].default, name
    refinement = {f.name: f.default for f in dataclasses.fields(Refinement)}
    for name in ("optimizer", "fmax", "steps"):
        assert params[f"refine_{name}"] == refinement[name], name

"""Training recipes (train/presets.py): one set of defaults, named variants, the data-aware choices."""

from __future__ import annotations

import dataclasses

import pytest

from ase_bptt.runs.config import AUTO, ConfigError
from ase_bptt.train.finetune_config import CANDIDATE_FIELDS, FinetuneConfig
from ase_bptt.train.presets import (
    TRAINING_RECIPES,
    DataSummary,
    bptt_steps,
    candidate_configs,
    finetune_config,
    pretrain_config,
    pretrain_steps,
    resolve_finetune,
    resolve_pretrain,
    rollout_frames,
)
from ase_bptt.train.pretrain import DEFAULT_MODEL, PretrainConfig


def test_the_default_recipe_is_the_configs_own_defaults():
    """No copies: the CLI, the API's FinetuneConfig() and the default recipe are one set of numbers."""
    assert finetune_config().to_dict() == FinetuneConfig().to_dict()
    assert pretrain_config().to_dict() == PretrainConfig().to_dict()
    assert FinetuneConfig().pretrain.model == DEFAULT_MODEL
    # What the default is (the measured recipe of docs/results.md), field by field.
    c = FinetuneConfig()
    assert (c.step, c.tol, c.max_steps, c.lr, c.batch_size, c.eval_every) == ("fire", AUTO, AUTO, 5e-4, 4, 15)
    assert (c.lr_schedule, c.warmup) == ("cosine", 5)
    assert (c.force_weight, c.energy_weight, c.max_batches, c.export) == (10.0, AUTO, AUTO, "auto")
    assert c.candidates == {}  # nothing raced by default (docs/results.md: lr 5e-4 won on every set)
    p = c.pretrain
    assert (p.max_steps, p.lr, p.batch_size, p.patience) == (AUTO, 2e-3, 16, None)
    assert DEFAULT_MODEL == {"model_name": "adapt-mi", "d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}


def test_every_recipe_builds_and_records_its_name():
    assert set(TRAINING_RECIPES) == {"default", "paper", "quick", "universal"}
    for name in TRAINING_RECIPES:
        config = finetune_config(name)
        assert config.recipe == name and config.pretrain.recipe == name
    paper = finetune_config("paper")
    assert (paper.step, paper.force_weight, paper.candidates, paper.export) == ("fixed", 0.0, {}, "own")
    assert paper.pretrain.model["d_model"] == 64 and "model_name" not in paper.pretrain.model  # ADAPT
    universal = finetune_config("universal")
    assert (universal.step, universal.checkpoint_frames, universal.candidates) == ("fixed", True, {})
    with pytest.raises(
        ConfigError, match="unknown training recipe 'fast'; choose one of default, paper, quick, universal"
    ):
        finetune_config("fast")


def test_changes_go_on_top_of_the_recipe():
    c = finetune_config("paper", lr=1e-3, pretrain={"max_steps": 7})
    assert (c.lr, c.step, c.pretrain.max_steps, c.pretrain.lr) == (1e-3, "fixed", 7, 1e-3)
    # A model change keeps the recipe's architecture; another architecture starts from its own defaults.
    assert pretrain_config(model={"d_model": 64}).model == {**DEFAULT_MODEL, "d_model": 64}
    assert pretrain_config(model={"model_name": "adapt"}).model == {}
    # A setting the user gives is theirs: a recipe races no candidate for it.
    TRAINING_RECIPES["raced"] = dataclasses.replace(
        TRAINING_RECIPES["default"], name="raced", finetune={"candidates": {"lr": (5e-4, 1e-3)}}
    )
    try:
        assert finetune_config("raced", lr=1e-3).candidates == {}
        assert finetune_config("raced", force_weight=3.0).candidates == {"lr": (5e-4, 1e-3)}
    finally:
        del TRAINING_RECIPES["raced"]
    explicit = finetune_config(candidates={"force_weight": (3.0, 10.0)}, lr=1e-3)
    assert explicit.candidates == {"force_weight": (3.0, 10.0)}


def test_budgets_scale_with_the_data_within_bounds():
    # About five passes over the train frames, rounded to 100 steps, within 1000..3000 steps of 16 frames.
    assert pretrain_steps(7000, 16) == 2200  # 5 * 7000 / 16 = 2187.5
    assert pretrain_steps(2000, 16) == 1000 and pretrain_steps(50_000, 16) == 3000
    # 1.5 BPTT steps per train relaxation, rounded to 10, within 60..180.
    assert bptt_steps(97) == 150 and bptt_steps(128) == 180  # 145.5 -> 150; 192 -> 180 (the cap)
    assert bptt_steps(10) == 60 and bptt_steps(1000) == 180
    # Rollouts: 1.2 x the 90th percentile of the train relaxations' frames, rounded up to 5, within 50..200.
    assert rollout_frames(83.4) == 105 and rollout_frames(104.2) == 130  # 100.08 -> 105; 125.04 -> 130
    assert rollout_frames(20) == 50 and rollout_frames(400) == 200


def test_auto_settings_are_decided_from_the_data_and_announced():
    data = DataSummary(relaxations=97, frames=7000, energies=True, frames_p90=83.4)
    fire, notes = resolve_finetune(FinetuneConfig(), data)
    assert (fire.tol, fire.energy_weight, fire.max_batches, fire.max_steps) == (1e-5, 30.0, 150, 105)
    assert len(notes) == 4 and all("\n" not in n for n in notes)
    assert any("energy term: weight 30" in n for n in notes) and any("150 optimiser steps" in n for n in notes)
    fixed, _ = resolve_finetune(FinetuneConfig(step="fixed"), DataSummary(97, 7000, energies=False))
    assert (fixed.tol, fixed.energy_weight) == (1e-3, 0.0)
    # Given settings are kept, and resolving twice changes nothing.
    given, notes = resolve_finetune(FinetuneConfig(tol=2e-4, energy_weight=1.0, max_batches=7, max_steps=9), data)
    assert (given.tol, given.energy_weight, given.max_batches, given.max_steps, notes) == (2e-4, 1.0, 7, 9, [])
    assert resolve_finetune(fire, data)[0] == fire
    pre, notes = resolve_pretrain(PretrainConfig(), data)
    assert pre.max_steps == 2200 and any("adapt-mi" in n for n in notes)
    with pytest.raises(RuntimeError, match="still 'auto'"):
        FinetuneConfig().decided("tol")


def test_candidates_race_only_the_settings_left_at_their_defaults():
    assert [name for name, _ in candidate_configs(FinetuneConfig())] == [""]
    runs = candidate_configs(FinetuneConfig(candidates={"lr": (5e-4, 1e-3)}))
    assert [name for name, _ in runs] == ["lr 0.0005", "lr 0.001"]
    assert [c.lr for _, c in runs] == [5e-4, 1e-3] and all(c.candidates == {} for _, c in runs)
    assert [name for name, _ in candidate_configs(FinetuneConfig(lr=1e-3, candidates={"lr": (5e-4, 1e-3)}))] == [""]
    assert len(candidate_configs(FinetuneConfig(candidates={}))) == 1
    both = candidate_configs(FinetuneConfig(candidates={"lr": (5e-4, 1e-3), "force_weight": (10.0, 3.0)}))
    assert [name for name, _ in both] == [
        "lr 0.0005, force_weight 10",
        "lr 0.0005, force_weight 3",
        "lr 0.001, force_weight 10",
        "lr 0.001, force_weight 3",
    ]


@pytest.mark.parametrize(
    "candidates, match",
    [
        ({"seed": (0, 1)}, "keyed by"),
        ({"lr": (5e-4,)}, "two or more different values of lr"),
        ({"lr": (5e-4, -1.0)}, "lr must be positive"),
        ({"step": ("fire", "sideways")}, "step must be one of"),
    ],
)
def test_bad_candidates_are_config_errors(candidates, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(candidates=candidates)


def test_candidate_fields_are_config_fields():
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(CANDIDATE_FIELDS) <= names

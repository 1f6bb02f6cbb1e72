"""Per-label weights of the BPTT Dq term (``label_weights``, ``--label-weight``).

The weights are checked against hand-computed values, and their effect on training
against an independent run: weights (1, 0) on a batch of two structures must give
the same optimiser step as a run whose train split holds only the first structure
(the weights are scaled to mean 1, so the loss is that structure's Dq in both).
"""

from __future__ import annotations

import pytest
import torch
from conftest import emt_cu_relaxation
from test_train_finetune import config, emt_db, init_model  # noqa: F401 (fixtures)

from ase_bptt.runs.config import ConfigError
from ase_bptt.train.objectives import LabelWeightError, structure_weights

#: float64 runs of the same arithmetic in another batch layout (one structure or two).
SAME_STEP_ATOL = 1e-10


def test_weights_follow_exact_label_then_first_pattern_then_one_scaled_to_mean_one():
    labels = ["int:Ni", "sub:Ni", "sub:Pd", "vacancy"]
    # sub:Ni's exact key wins over the earlier pattern; int:* gives 0; vacancy matches nothing: 1.
    w = structure_weights(labels, {"sub:*": 2, "sub:Ni": 4, "int:*": 0})
    assert w.tolist() == pytest.approx([0, 16 / 7, 8 / 7, 4 / 7], rel=1e-12)  # raw (0, 4, 2, 1), sum 7, 4 structures
    # Of two matching patterns, the first in the mapping's order.
    # raw (1, 3, 3, 1), sum 8: scaled by 4 / 8.
    assert structure_weights(labels, {"s*": 3, "sub:*": 5}).tolist() == pytest.approx([0.5, 1.5, 1.5, 0.5])
    assert structure_weights(labels, {}) is None and structure_weights(labels, None) is None


def test_a_key_that_matches_nothing_or_all_zero_weights_are_errors():
    with pytest.raises(LabelWeightError, match=r"'intt:\*' match\(es\) no train structure; its labels are: int:Ni"):
        structure_weights(["int:Ni", "vacancy"], {"vacancy": 2, "intt:*": 3})
    with pytest.raises(LabelWeightError, match="every train structure weight 0"):
        structure_weights(["vacancy"], {"*": 0})


@pytest.mark.parametrize("bad", [{"x": -1}, {"x": float("nan")}, {"x": float("inf")}, {"": 1}, {"x": "2"}])
def test_config_refuses_bad_weights(bad):
    with pytest.raises(ConfigError, match="label_weights must be label or pattern -> finite weight >= 0"):
        config(label_weights=bad)


def test_config_round_trip_keeps_the_weights():
    from ase_bptt.train.finetune import FinetuneConfig

    cfg = config(label_weights={"int:*": 3, "sub:Ni": 2})
    back = FinetuneConfig.from_dict(cfg.to_dict())
    assert back.label_weights == {"int:*": 3.0, "sub:Ni": 2.0} and list(back.label_weights) == ["int:*", "sub:Ni"]


def _db(path, train_labels):
    """Train: the first len(train_labels) Cu vacancy relaxations with these labels; val: two others."""
    from ase_bptt.data.db import TrajectoryDB

    db = TrajectoryDB(path)
    for k, label in enumerate(train_labels):
        db.add_trajectory(emt_cu_relaxation(k), label=label, source="test", split="train")
    for k in (10, 11):
        db.add_trajectory(emt_cu_relaxation(k), label="vacancy", source="test", split="val")
    return path


def test_zero_weight_equals_leaving_the_structure_out(init_model, tmp_path):  # noqa: F811
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    def one_step(db, name, **changes):
        cfg = config(eta=0.05, epochs=1, batch_size=2, dtype="float64", **changes)
        out = finetune(db, tmp_path / name, init=init_model, config=cfg, progress=False)
        return load_state(state_path(out))["model"]

    both = _db(tmp_path / "ab.db", ["a", "b"])
    weighted = one_step(both, "w.pt", label_weights={"a": 1, "b": 0})
    alone = one_step(_db(tmp_path / "a.db", ["a"]), "a.pt")
    plain = one_step(both, "p.pt")
    uniform = one_step(both, "u.pt", label_weights={"*": 5})  # scaled to mean 1: the plain run
    diff = max(float((weighted[k] - alone[k]).abs().max()) for k in alone)
    assert diff < SAME_STEP_ATOL
    assert max(float((weighted[k] - plain[k]).abs().max()) for k in plain) > 1e3 * SAME_STEP_ATOL
    assert all(torch.allclose(uniform[k], plain[k], rtol=0, atol=SAME_STEP_ATOL) for k in plain)


def test_cli_label_weight(init_model, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from ase_bptt.cli import cli
    from ase_bptt.models.checkpoint import load_checkpoint

    db = _db(tmp_path / "ab.db", ["int:Ni", "sub:Pd"])
    base = ["--quiet", "finetune", str(db), "--init", str(init_model), "--step", "fixed", "--eta", "0.05"]
    base += ["--epochs", "1", "--lr", "1e-3", "--export", "own"]
    bad = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "bad.pt"), "--label-weight", "int"])
    assert bad.exit_code == 2 and "'int' is not LABEL=WEIGHT" in bad.output
    typo = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "typo.pt"), "--label-weight", "intt:*=3"])
    assert typo.exit_code == 1 and "'intt:*' match(es) no train structure" in typo.output
    assert len(typo.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.db"]  # no checkpoint, no state file
    ok = CliRunner().invoke(
        cli, [*base, "-o", str(tmp_path / "ok.pt"), "--label-weight", "int:*=3", "--label-weight", "sub:Pd=0.5"]
    )
    assert ok.exit_code == 0, ok.output
    assert load_checkpoint(tmp_path / "ok.pt")["metadata"]["config"]["label_weights"] == {"int:*": 3.0, "sub:Pd": 0.5}


def test_default_weights_keep_the_config_hash_of_older_state_files():
    """A run interrupted before label_weights existed (no such key in its config) still resumes."""
    from ase_bptt.runs.config import RUN_CONTROL, config_hash

    new = config().to_dict()
    old = {k: v for k, v in new.items() if k != "label_weights"}
    assert config_hash(new, ignore=RUN_CONTROL) == config_hash(old, ignore=RUN_CONTROL)
    weighted = config(label_weights={"*": 2}).to_dict()
    assert config_hash(weighted, ignore=RUN_CONTROL) != config_hash(new, ignore=RUN_CONTROL)

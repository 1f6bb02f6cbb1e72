"""Settings chosen on val by a race of candidates (train/candidates.py), in parallel processes and in one."""

from __future__ import annotations

import pytest
import torch
from test_train_finetune import config, emt_db, init_model  # noqa: F401 (fixtures)

from ase_bptt.models.checkpoint import load_checkpoint
from ase_bptt.train.finetune import finetune

#: The race's own record against each candidate's checkpoint (the same float64 numbers, copied).
SAME = 1e-12


def race_config(**changes):
    """Two learning rates raced, float64 so two processes and one give the same numbers."""
    base = dict(lr=5e-4, epochs=2, dtype="float64", candidates={"lr": (5e-4, 1e-2)}, export="auto", tol=1e-3)
    return config(**{**base, **changes})


def exported_val(path) -> float:
    record = load_checkpoint(path)["metadata"]["no_harm"]
    return record["pretrained_val_dq" if record["exported"] == "pretrained" else "tuned_val_dq"]


@pytest.mark.parametrize("workers", [2, 1])
def test_the_candidate_with_the_best_exported_val_loss_wins(emt_db, init_model, tmp_path, workers):  # noqa: F811
    out = finetune(emt_db, tmp_path / "m.pt", init=init_model, config=race_config(), progress=False, workers=workers)
    folder = tmp_path / "m.candidates"
    paths = {"lr 0.0005": folder / "lr-0.0005.pt", "lr 0.01": folder / "lr-0.01.pt"}
    assert all(p.is_file() for p in paths.values())
    by_hand = {name: exported_val(p) for name, p in paths.items()}
    meta = load_checkpoint(out)["metadata"]
    chosen = min(by_hand, key=by_hand.get)
    assert meta["chosen"] == chosen and meta["config"]["lr"] == float(chosen.split()[1])
    for name, value in by_hand.items():
        assert meta["candidates"][name]["val"] == pytest.approx(value, rel=SAME)
        assert meta["candidates"][name]["config"]["lr"] == float(name.split()[1])
    winner = load_checkpoint(paths[chosen])["model"]["state_dict"]
    assert all(torch.equal(winner[k], v) for k, v in load_checkpoint(out)["model"]["state_dict"].items())
    assert len(set(by_hand.values())) == 2  # the candidates differ: the choice is not a tie


def test_parallel_and_sequential_races_agree_and_a_rerun_trains_nothing(emt_db, init_model, tmp_path):  # noqa: F811
    two = finetune(emt_db, tmp_path / "a" / "m.pt", init=init_model, config=race_config(), workers=2, progress=False)
    one = finetune(emt_db, tmp_path / "b" / "m.pt", init=init_model, config=race_config(), workers=1, progress=False)
    a, b = load_checkpoint(two)["metadata"], load_checkpoint(one)["metadata"]
    assert a["chosen"] == b["chosen"]
    for name in a["candidates"]:
        assert a["candidates"][name]["val"] == pytest.approx(b["candidates"][name]["val"], rel=1e-9)
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "a").rglob("*.pt")}
    finetune(emt_db, tmp_path / "a" / "m.pt", init=init_model, config=race_config(), workers=2, progress=False)
    assert {p: p.stat().st_mtime for p in stamps} == stamps


def test_an_existing_output_of_another_run_is_refused_before_any_training(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.runs.errors import ConfigMismatchError

    out = finetune(emt_db, tmp_path / "m.pt", init=init_model, config=config(epochs=1), progress=False)
    with pytest.raises(ConfigMismatchError, match="not made by this race of candidates"):
        finetune(emt_db, out, init=init_model, config=race_config(), progress=False)
    assert not (tmp_path / "m.candidates").exists()


def test_a_killed_candidate_fails_the_race_naming_it_and_a_rerun_completes(emt_db, init_model, tmp_path, monkeypatch):  # noqa: F811
    """A candidate process that dies (SIGKILL after its first optimiser step, the loop's test hook) fails the
    race with one error naming each candidate; the same call again resumes both from their states."""
    from ase_bptt.runs.errors import TrainingError
    from ase_bptt.runs.loop import KILL_ENV

    monkeypatch.setenv(KILL_ENV, "1")
    with pytest.raises(TrainingError, match=r"lr 0.0005 failed \(.*\); its log is .*lr-0.0005.pt.log"):
        finetune(emt_db, tmp_path / "m.pt", init=init_model, config=race_config(), workers=2, progress=False)
    monkeypatch.delenv(KILL_ENV)
    out = finetune(emt_db, tmp_path / "m.pt", init=init_model, config=race_config(), workers=2, progress=False)
    assert load_checkpoint(out)["metadata"]["chosen"] in ("lr 0.0005", "lr 0.01")


def test_a_candidate_the_data_cannot_take_is_refused_before_anything_is_written(tmp_path, init_model):  # noqa: F811
    """Preflight checks every candidate: an energy term on frames without energies, raced, writes nothing."""
    from test_train_energy_term import no_energy_database

    from ase_bptt.runs.config import ConfigError

    db = no_energy_database(tmp_path / "noe.db")
    cfg = race_config(candidates={"energy_weight": (0.0, 30.0)}, energy_weight="auto")  # auto: 0 on this data
    with pytest.raises(ConfigError, match="energy_weight needs a reference energy"):
        finetune(db, tmp_path / "m.pt", init=init_model, config=cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noe.db"]

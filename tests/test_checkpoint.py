"""Checkpoints: bitwise reload, weights_only loading, and one error per bad file."""

from __future__ import annotations

import os
import zipfile
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from ase_bptt.batch import Batch
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import (
    FORMAT_VERSION,
    MODEL_REGISTRY,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    CorruptCheckpointError,
    NonFiniteWeightsError,
    NotACheckpointError,
    UnknownModelError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


@pytest.fixture
def model(si_small):
    torch.manual_seed(0)
    m = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2))
    batch = Batch.from_atoms(si_small)
    m.fit_standardisation(batch, torch.randn(1, 7, 3), torch.tensor([-32.0]))
    return m.eval()


@pytest.fixture
def saved(tmp_path, model):
    relax = {"step": {"rule": "fixed", "eta": torch.tensor(0.05)}, "tol": 1e-3, "max_steps": 75}
    meta = {"note": "test", "n": np.int64(3), "created": "2001-01-01T00:00:00Z"}  # stale, copied from a parent
    return save_checkpoint(tmp_path / "si.pt", model, relax=relax, metadata=meta)


def test_reload_is_bitwise_identical(saved, model, si_vacancy):
    batch = Batch.from_atoms(si_vacancy, dtype=torch.float32)
    loaded = load_model(saved)
    assert not loaded.training and loaded.config == model.config
    a, b = model(batch), loaded(batch)
    assert torch.equal(a.forces, b.forces) and torch.equal(a.energy, b.energy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_loads_with_plain_weights_only_torch_load(saved):
    data = torch.load(saved, weights_only=True)  # no ase-bptt code involved
    assert data["format"] == "ase-bptt" and data["format_version"] == FORMAT_VERSION
    assert data["model"]["name"] == "ADAPT" and isinstance(data["model"]["config"], dict)
    assert data["relax"]["max_steps"] == 75 and float(data["relax"]["step"]["eta"]) == pytest.approx(0.05)
    meta = data["metadata"]
    assert meta["note"] == "test" and meta["n"] == 3
    created = datetime.fromisoformat(meta["created"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - created).total_seconds()) < 600
    assert meta["package_version"] == data["package_version"]


def test_load_model_dtype_and_dict(saved, si_small):
    ckpt = load_checkpoint(saved)
    m64 = load_model(ckpt, dtype=torch.float64)
    assert m64.force_head.weight.dtype == torch.float64
    out = m64(Batch.from_atoms(si_small))
    assert out.forces.dtype == torch.float64


def test_atomic_write_leaves_no_temporary(tmp_path, model):
    path = tmp_path / "sub" / "a.pt"
    save_checkpoint(path, model)
    save_checkpoint(path, model)  # overwrite
    assert sorted(os.listdir(path.parent)) == ["a.pt"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # same permissions as open() gives


def test_non_json_metadata_is_refused(tmp_path, model):
    with pytest.raises(TypeError, match="metadata.bad"):
        save_checkpoint(tmp_path / "x.pt", model, metadata={"bad": object()})
    assert not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------- error cases
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # also an ordinary FileNotFoundError
        load_model(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(NotACheckpointError, match="notes.pt"):
        load_checkpoint(path)


def test_other_zip_archive(tmp_path):
    path = tmp_path / "bundle.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(NotACheckpointError, match="bundle.pt.*zip archive"):
        load_checkpoint(path)


def test_directory(tmp_path):
    with pytest.raises(NotACheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_plain_state_dict(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(NotACheckpointError, match="weights.pt.*plain state dict"):
        load_checkpoint(path)


def test_future_format_version(tmp_path, saved):
    data = torch.load(saved, weights_only=True)
    data["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointVersionError, match="future.pt.*upgrade ase-bptt"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, saved, keep):
    raw = saved.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CorruptCheckpointError, match="cut.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("where", [0.01, 0.3, 0.7])
def test_damaged_bytes_are_detected(tmp_path, saved, where):
    raw = bytearray(saved.read_bytes())
    i = int(len(raw) * where)
    raw[i : i + 32] = bytes(32)  # zeroed block, e.g. inside a tensor's data
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="damaged.pt"):
        load_checkpoint(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ase-bptt", "payload": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CorruptCheckpointError, match="evil.pt.*unsafe"):
        load_checkpoint(path)


@pytest.mark.parametrize("drop", ["model", "metadata", "model.state_dict"])
def test_missing_keys(tmp_path, saved, drop):
    data = torch.load(saved, weights_only=True)
    if "." in drop:
        outer, inner = drop.split(".")
        del data[outer][inner]
    else:
        del data[drop]
    path = tmp_path / "partial.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointKeyError, match=rf"partial.pt.*{drop}"):
        load_checkpoint(path)


def test_weights_not_matching_config(tmp_path, saved):
    data = torch.load(saved, weights_only=True)
    del data["model"]["state_dict"]["force_head.weight"]
    with pytest.raises(CheckpointKeyError, match="force_head.weight"):
        load_model(data)


def test_weights_not_matching_config_name_the_file(tmp_path, saved):
    from ase_bptt.calculator import BPTTCalculator

    data = torch.load(saved, weights_only=True)
    data["model"]["config"]["d_model"] = 32  # the weights are for d_model=16
    path = tmp_path / "mismatch.pt"
    torch.save(data, path)
    for load in (load_model, BPTTCalculator):
        with pytest.raises(CheckpointKeyError, match=r"mismatch\.pt: weights do not match the ADAPT config") as e:
            load(path)
        assert "checkpoint dict" not in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, saved, bad):
    data = torch.load(saved, weights_only=True)
    data["model"]["state_dict"]["blocks.0.qkv.bias"][3] = bad
    path = tmp_path / "diverged.pt"
    torch.save(data, path)
    load_checkpoint(path)  # the file itself is intact: the weights are the problem
    with pytest.raises(
        NonFiniteWeightsError, match=r"diverged\.pt holds NaN or infinite weights.*blocks\.0\.qkv\.bias"
    ):
        load_model(path)
    with pytest.raises(NonFiniteWeightsError, match=r"^from-disk holds"):
        load_model(data, name="from-disk")


#: float64 minimum-image distances against ASE's neighbour list: round-off only.
DISTANCE_TOL = 1e-10


def ase_shortest_distance(frames) -> float:
    """The independent reference: ASE's neighbour list over every periodic image."""
    from ase.neighborlist import neighbor_list

    return min(float(neighbor_list("d", a, 4.0).min()) for a in frames)


def test_training_domain_of_batch_and_of_atoms(si_small, si_vacancy):
    from ase.build import molecule

    from ase_bptt.models.domain import training_domain

    water = molecule("H2O")  # no cell, not periodic
    frames = [si_small, si_vacancy, water]
    expected = {
        "species": [1, 8, 14],
        "n_atoms": [3, 63],
        "pbc": [[False, False, False], [True, True, True]],
        "n_structures": 3,
    }
    for domain in (training_domain(frames), training_domain(Batch.from_atoms(frames))):
        assert domain.pop("min_distance") == pytest.approx(ase_shortest_distance(frames), abs=DISTANCE_TOL)
        assert domain == expected


def test_shortest_distance_of_periodic_cells_matches_ase(si_small, si_vacancy):
    from ase.build import bulk

    from ase_bptt.models.domain import shortest_distance

    primitive = bulk("Si", "diamond", a=5.43)  # 2 atoms, skewed fcc vectors: the nearest pair crosses the cell
    primitive.rattle(0.05, seed=3)
    squeezed = si_small.copy()
    squeezed.positions[2] = squeezed.positions[5] + [0.3, 0.0, 0.0]  # 0.3 A apart
    for frames in ([si_vacancy], [primitive], [si_small, squeezed]):
        found = shortest_distance(Batch.from_atoms(frames))
        assert found == pytest.approx(ase_shortest_distance(frames), abs=DISTANCE_TOL)


def test_merged_training_domains_cover_each(si_small, si_vacancy):
    from ase.build import molecule

    from ase_bptt.models.domain import merge_training_domains, training_domain

    water = molecule("H2O")
    merged = merge_training_domains(training_domain([si_vacancy]), None, training_domain([water, si_small]))
    assert merged == training_domain([si_small, si_vacancy, water])
    assert merge_training_domains(None, None) is None


def test_saved_training_domain_round_trips(tmp_path, model, si_small):
    from ase_bptt.models.domain import read_training_domain, training_domain

    domain = training_domain([si_small])
    path = save_checkpoint(tmp_path / "d.pt", model, metadata={"training_domain": domain})
    assert read_training_domain(load_checkpoint(path)) == domain
    assert read_training_domain(load_checkpoint(path)) == {
        "species": [14],
        "n_atoms": [7, 7],
        "pbc": [[True, True, True]],
        "n_structures": 1,
        "min_distance": domain["min_distance"],
    }


def test_old_checkpoint_without_domain_loads_without_warning(saved, recwarn):
    from ase_bptt.models.domain import read_training_domain

    assert read_training_domain(load_checkpoint(saved)) is None
    load_model(saved)
    assert not recwarn.list


@pytest.mark.parametrize(
    "domain", [{"n_atoms": [8, 4], "pbc": [[True] * 3], "species": [14]}, {"n_atoms": [4, 8]}, "Si, 4-8 atoms"]
)
def test_malformed_training_domain(tmp_path, model, domain):
    from ase_bptt.models.domain import read_training_domain

    path = save_checkpoint(tmp_path / "odd.pt", model, metadata={"training_domain": domain})
    with pytest.raises(CorruptCheckpointError, match=r"odd\.pt: metadata\.training_domain is malformed"):
        read_training_domain(load_checkpoint(path), str(path))


def test_unknown_model_name(saved):
    data = torch.load(saved, weights_only=True)
    data["model"]["name"] = "MACE"
    with pytest.raises(UnknownModelError, match="MACE"):
        load_model(data)
    assert "ADAPT" in MODEL_REGISTRY


def test_errors_are_distinct_checkpoint_errors():
    kinds = [
        CheckpointNotFoundError,
        NotACheckpointError,
        CheckpointVersionError,
        CorruptCheckpointError,
        CheckpointKeyError,
        UnknownModelError,
        NonFiniteWeightsError,
    ]
    assert all(issubclass(k, CheckpointError) for k in kinds)
    assert len(set(kinds)) == len(kinds)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert not issubclass(a, b) and not issubclass(b, a)


class _RunsCode:
    """A pickle payload that would run a program if unpickled (``weights_only`` refuses it first)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [_RunsCode(), zipfile.ZipInfo("x")])
def test_pickle_refusal_names_the_object_and_never_suggests_unsafe_loading(tmp_path, payload):
    from ase_bptt.runs.state import StateError, load_state

    path = tmp_path / "evil.pt"
    torch.save({"format": "ase-bptt", "payload": payload}, path)
    expected = "posix.system" if isinstance(payload, _RunsCode) else "zipfile.ZipInfo"
    for load, error in ((load_checkpoint, CorruptCheckpointError), (load_state, StateError)):
        with pytest.raises(error) as info:
            load(path)
        text = str(info.value)
        assert str(path) in text and f"asks for the Python object {expected}" in text
        assert "False" not in text and "likely succeed" not in text


def _with_rule(tmp_path, model, name: str, rule) -> str:
    from ase_bptt.relax.registry import relax_settings

    return save_checkpoint(tmp_path / name, model, relax=relax_settings(rule))


def test_a_non_finite_or_negative_step_rule_is_refused_when_the_checkpoint_loads(tmp_path, model):
    from click.testing import CliRunner

    from ase_bptt.calculator import BPTTCalculator
    from ase_bptt.cli import cli
    from ase_bptt.models.checkpoint import InvalidStepRuleError
    from ase_bptt.relax.steps import FixedStep, LearnedStep

    diverged = LearnedStep(0.05)
    with torch.no_grad():
        diverged.log_eta.fill_(float("nan"))  # what a diverged --step learned run stores
    nan_path = _with_rule(tmp_path, model, "nan-eta.pt", diverged)
    negative = FixedStep(0.05)
    negative.eta = -0.05  # a hand-edited or foreign checkpoint
    negative_path = _with_rule(tmp_path, model, "negative-eta.pt", negative)
    for path, text in (
        (nan_path, "non-finite step rule (relax.step.eta = nan)"),
        (negative_path, "eta must be positive"),
    ):
        with pytest.raises(InvalidStepRuleError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and text in str(info.value)
        with pytest.raises(InvalidStepRuleError, match="eta"):
            BPTTCalculator(path)
        result = CliRunner().invoke(cli, ["info", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.startswith(f"Error: {path}") and text.split(" (")[0] in result.output

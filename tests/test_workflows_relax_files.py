"""``ase-bptt relax`` on bad input: unreadable files, unwritable outputs, non-finite results, out-of-domain input.

Every case is a real file written in ``tmp_path`` and ends in one ``Error: ...``
line naming the file (or structure) with exit status 1, and no output file.
The checkpoints are tiny untrained ADAPT models for Cu (see :func:`cu_checkpoint`).
"""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from click.testing import CliRunner

from ase_bptt.batch import Batch
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.cli import cli
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.steps import FixedStep, relax_settings

#: The training domain written into the "new" checkpoints of these tests: 4-8 atom periodic Cu cells.
CU_DOMAIN = {"species": [29], "n_atoms": [4, 8], "pbc": [[True, True, True]], "n_structures": 3}


def rattled_cu(n_frames: int = 1, repeat: tuple[int, int, int] = (2, 1, 1), seed: int = 3) -> list[Atoms]:
    """Rattled fcc Cu cells (8 atoms by default)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * repeat
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def cu_checkpoint(path, *, domain: dict | None = None, nan_weights: bool = False, seed: int = 0):
    """A tiny ADAPT for Cu, standardised on EMT forces of rattled cells, with a fixed-step rule.

    ``domain`` goes into ``metadata["training_domain"]`` (None: an old checkpoint without one);
    ``nan_weights`` puts a NaN into the force head, as a diverged training run would.
    """
    torch.manual_seed(seed)
    model = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2, species=(29,)))
    frames = rattled_cu(3)
    for atoms in frames:
        atoms.calc = EMT()
    batch = Batch.from_atoms(frames)
    forces = torch.from_numpy(np.stack([a.get_forces() for a in frames]))
    model.fit_standardisation(batch, forces)
    if nan_weights:
        with torch.no_grad():
            model.force_head.weight[0, 0] = float("nan")
    metadata = {} if domain is None else {"training_domain": domain}
    relax = relax_settings(FixedStep(0.02, maxstep=0.2), tol=1e-3, max_steps=10)
    return save_checkpoint(path, model, relax=relax, metadata=metadata)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return cu_checkpoint(tmp_path_factory.mktemp("relax") / "cu.pt", domain=CU_DOMAIN)


def run(*args):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def error_line(result) -> str:
    """The single ``Error: ...`` line of a command that failed with exit status 1 (no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def relax(inp, model, out, *extra):
    return run("relax", inp, "--model", model, "-o", out, "--optimizer", "fire", "--steps", "3", *extra)


def no_relaxation(monkeypatch):
    """Make any model evaluation fail loudly: the case must be refused before relaxing."""

    def boom(self, *args, **kwargs):
        raise AssertionError("relaxed before checking the output format")

    monkeypatch.setattr(BPTTCalculator, "calculate", boom)


# ------------------------------------------------------------ item 5: unreadable input
GARBAGE = {
    "bad.xyz": (b"garbage\nnot an xyz file\n1 2 3\n", "extxyz"),
    "POSCAR": (b"garbage\n", "vasp"),
    "bad.traj": (b"garbage garbage garbage\n", "traj"),
    "bad.cif": (b"garbage\n", "cif"),
    "binary.extxyz": (bytes(range(256)) * 4, "extxyz"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_unreadable_input_is_one_error_line(model, tmp_path, name):
    content, fmt = GARBAGE[name]
    (tmp_path / name).write_bytes(content)
    line = error_line(relax(tmp_path / name, model, tmp_path / "out.extxyz"))
    assert f"{tmp_path / name}: cannot be read as {fmt}" in line and "--input-format" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_input_without_structures(model, tmp_path):
    (tmp_path / "empty.extxyz").write_text("")
    line = error_line(relax(tmp_path / "empty.extxyz", model, tmp_path / "out.extxyz"))
    assert "empty.extxyz" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_unknown_input_format_option(model, tmp_path):
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(1))
    line = error_line(relax(tmp_path / "cu.extxyz", model, tmp_path / "o.extxyz", "--input-format", "nonsense"))
    assert "nonsense" in line and "--input-format" in line


def test_single_structure_format_for_many_frames_is_refused_before_relaxing(model, tmp_path, monkeypatch):
    ase.io.write(tmp_path / "three_frames.extxyz", rattled_cu(3))
    no_relaxation(monkeypatch)
    line = error_line(relax(tmp_path / "three_frames.extxyz", model, tmp_path / "CONTCAR"))
    assert "CONTCAR" in line and "vasp" in line and "3" in line and "extxyz" in line
    assert not (tmp_path / "CONTCAR").exists()


@pytest.mark.parametrize(
    ("output", "options"),
    [("out.unknownext", ()), ("relaxed", ()), ("out.xyz", ("--output-format", "nonsense"))],
)
def test_unknown_output_format_is_refused_before_relaxing(model, tmp_path, monkeypatch, output, options):
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(1))
    no_relaxation(monkeypatch)
    line = error_line(relax(tmp_path / "cu.extxyz", model, tmp_path / output, *options))
    assert output in line and "--output-format" in line and "extxyz" in line
    assert not (tmp_path / output).exists()


def test_many_frames_to_a_multi_frame_format(model, tmp_path):
    ase.io.write(tmp_path / "three_frames.extxyz", rattled_cu(3))
    result = relax(tmp_path / "three_frames.extxyz", model, tmp_path / "out.traj")
    assert result.exit_code == 0, result.output
    assert len(ase.io.read(tmp_path / "out.traj", index=":")) == 3
    assert not list(tmp_path.glob(".out.traj.*"))  # the temporary file was renamed


# ------------------------------------------------------------ item 6: non-finite results
@pytest.mark.parametrize("cell", [np.zeros((3, 3)), [[3.6, 0, 0], [7.2, 0, 0], [0, 0, 3.6]]])
def test_periodic_structure_with_zero_or_singular_cell(model, tmp_path, cell):
    atoms = rattled_cu(1)[0]
    atoms.set_cell(cell)
    atoms.pbc = True
    ase.io.write(tmp_path / "flat.extxyz", atoms)
    line = error_line(relax(tmp_path / "flat.extxyz", model, tmp_path / "out.extxyz"))
    assert "flat.extxyz (frame 0, Cu8)" in line and "zero or singular" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_checkpoint_with_nan_weights_writes_nothing(tmp_path):
    bad = cu_checkpoint(tmp_path / "diverged.pt", nan_weights=True)
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(1))
    line = error_line(relax(tmp_path / "cu.extxyz", bad, tmp_path / "out.extxyz"))
    assert "diverged.pt" in line and "NaN" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_nan_forces_during_the_relaxation_write_nothing(model, tmp_path, monkeypatch):
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(2))
    forward = ADAPT.forward
    calls = []

    def nan_on_third_call(self, batch, positions=None):
        out = forward(self, batch, positions)
        calls.append(1)
        return out._replace(forces=out.forces * float("nan")) if len(calls) == 3 else out

    monkeypatch.setattr(ADAPT, "forward", nan_on_third_call)
    line = error_line(relax(tmp_path / "cu.extxyz", model, tmp_path / "out.extxyz"))
    assert "cu.extxyz (frame 0)" in line and "non-finite" in line and "cu.pt" in line
    assert not (tmp_path / "out.extxyz").exists()


# ------------------------------------------------------------ item 7: outside the training domain
def test_cluster_without_cell_is_refused(model, tmp_path):
    cluster = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
    ase.io.write(tmp_path / "cluster.xyz", cluster)
    line = error_line(relax(tmp_path / "cluster.xyz", model, tmp_path / "out.extxyz"))
    assert "cluster.xyz (frame 0, Cu4)" in line and "no periodic cell" in line and "cu.pt" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_slab_for_a_model_trained_on_bulk_is_refused(model, tmp_path):
    slab = rattled_cu(1)[0]
    slab.pbc = (True, True, False)
    ase.io.write(tmp_path / "slab.extxyz", slab)
    line = error_line(relax(tmp_path / "slab.extxyz", model, tmp_path / "out.extxyz"))
    assert "slab.extxyz (frame 0, Cu8)" in line and "not periodic along z" in line
    assert not (tmp_path / "out.extxyz").exists()


def test_large_cells_warn_once_and_still_relax(model, tmp_path):
    big = rattled_cu(2, repeat=(3, 2, 1))  # 24 atoms: 3x the trained maximum of 8
    ase.io.write(tmp_path / "big.extxyz", big)
    result = relax(tmp_path / "big.extxyz", model, tmp_path / "out.extxyz")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.output
    assert "24 atoms" in warnings[0] and "4-8 atoms" in warnings[0] and "cu.pt" in warnings[0]
    assert len(ase.io.read(tmp_path / "out.extxyz", index=":")) == 2


def test_structures_inside_the_domain_give_no_warning(model, tmp_path):
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(2))
    result = relax(tmp_path / "cu.extxyz", model, tmp_path / "out.extxyz")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output


def test_overlapping_atoms_are_refused_before_relaxing(tmp_path, monkeypatch):
    from ase_bptt.models.domain import training_domain

    path = cu_checkpoint(tmp_path / "d.pt", domain=training_domain(rattled_cu(3)))
    atoms = rattled_cu(1, seed=5)[0]
    atoms.positions[4] = atoms.positions[1] + [0.1, 0.0, 0.0]
    ase.io.write(tmp_path / "in.extxyz", [rattled_cu(1, seed=6)[0], atoms])
    no_relaxation(monkeypatch)
    line = error_line(relax(tmp_path / "in.extxyz", path, tmp_path / "out.extxyz"))
    assert f"{tmp_path / 'in.extxyz'} (frame 1, Cu8): atoms 1 (Cu) and 4 (Cu) are 0.100 A apart" in line
    assert "overlapping or duplicated atoms" in line and not (tmp_path / "out.extxyz").exists()

"""``ase-bptt info`` on checkpoints: it rebuilds the model it describes, so broken weights are an error."""

from __future__ import annotations

import ase.io
import torch
from test_workflows_relax_files import CU_DOMAIN, cu_checkpoint, error_line, rattled_cu, relax, run


def test_weights_not_matching_the_config(tmp_path):
    data = torch.load(cu_checkpoint(tmp_path / "cu.pt"), weights_only=True)
    data["model"]["config"]["n_layers"] = 2  # the weights hold one block
    torch.save(data, tmp_path / "mismatch.pt")
    line = error_line(run("info", tmp_path / "mismatch.pt"))
    assert "mismatch.pt: weights do not match the ADAPT config" in line and "blocks.1" in line
    ase.io.write(tmp_path / "cu.extxyz", rattled_cu(1))
    line = error_line(relax(tmp_path / "cu.extxyz", tmp_path / "mismatch.pt", tmp_path / "out.extxyz"))
    assert "mismatch.pt: weights do not match" in line and "checkpoint dict" not in line
    assert not (tmp_path / "out.extxyz").exists()


def test_nan_weights(tmp_path):
    line = error_line(run("info", cu_checkpoint(tmp_path / "diverged.pt", nan_weights=True)))
    assert "diverged.pt holds NaN or infinite weights (in force_head.weight)" in line


def test_training_domain_is_described(tmp_path):
    result = run("info", cu_checkpoint(tmp_path / "cu.pt", domain=CU_DOMAIN))
    assert result.exit_code == 0, result.output
    assert "trained   on Cu, 4-8 atoms, periodic along xyz" in result.output
    # described once, not also as a raw JSON metadata line
    assert not [line for line in result.output.splitlines() if line.strip().startswith("training_domain")]


def test_old_checkpoint_without_domain(tmp_path):
    result = run("info", cu_checkpoint(tmp_path / "old.pt"))
    assert result.exit_code == 0, result.output
    assert "ADAPT" in result.output and "trained " not in result.output

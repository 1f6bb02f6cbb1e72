"""The CHGNet backend: CHGNet (``pip install 'ase-bptt[chgnet]'``) as an energy model of positions.

CHGNet has two graphs: the atom graph (pairs within ``atom_graph_cutoff``, 6 A
for the 0.3.0 weights) and the bond graph (angles between bonds shorter than
``bond_graph_cutoff``, 3 A). Both are built once per structure with the
cutoffs plus the skin, from ASE's neighbour list, by CHGNet's own graph code
(``CrystalGraphConverter.create_graph``, its C version when compiled). Every
frame the bond vectors are recomputed from the positions tensor, the bonds and
angles beyond the model's cutoffs are dropped, and the rest goes through
CHGNet's own layers (``CHGNet._compute``, with its radial and angular bases),
so the energy is CHGNet's for any positions: measured equal to
``CHGNetCalculator`` to 1e-13 eV/A in float64 (``tests/test_backends_chgnet.py``).

``CHGNet._compute`` and ``BatchedGraph`` are CHGNet internals: the extra pins
chgnet below 0.5 and a checkpoint loads only under the chgnet version it was
tuned with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ase_bptt.backends.graph import neighbour_pairs
from ase_bptt.backends.registry import Backend, BackendError, quiet, register_backend
from ase_bptt.batch import Batch

__all__ = ["CHGNetBackend"]

#: CHGNet's element embedding covers Z = 1..94.
_MAX_Z = 94


@register_backend
class CHGNetBackend(Backend):
    """CHGNet as a :class:`~ase_bptt.backends.registry.Backend` (pretrained: ``0.3.0``, ``0.2.0``, ``r2scan``)."""

    name = "chgnet"
    package = "chgnet"
    extra = "chgnet"
    default_model = "0.3.0"
    # Floats one atom keeps per frame (float32, 6.5 A atom graph), with gradients (BPTT) and without (a
    # relaxation). It grows with the bonds and angles per atom: 0.67M on silicon (measured peak of a 10-frame
    # BPTT step, benchmarks/bench_backends.py), 5.0x that on rock-salt MgO (18 bonds under 3 A against 4);
    # set 10% above MgO, the densest measured, so on silicon it is 5.5x the need (docs/backends.md).
    memory_floats = (3_700_000, 1_700_000)
    small_architecture = {
        "atom_fea_dim": 8,
        "bond_fea_dim": 8,
        "angle_fea_dim": 8,
        "num_radial": 5,
        "num_angular": 5,
        "n_conv": 3,
        "atom_conv_hidden_dim": 8,
        "bond_conv_hidden_dim": 8,
        "mlp_hidden_dims": [8],
        "atom_graph_cutoff": 5.0,
        "bond_graph_cutoff": 3.0,
    }

    # ------------------------------------------------------------ package hooks
    @classmethod
    def _pretrained_dir(cls) -> Path:
        return Path(str(cls.import_package().__file__)).parent / "pretrained"

    @classmethod
    def pretrained_names(cls) -> tuple[str, ...]:
        root = cls._pretrained_dir()
        return tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and len(list(d.glob("*.pth.tar"))) == 1))

    @classmethod
    def weight_file(cls, model: str) -> Path:
        cls.check_model_name(model)
        (path,) = (cls._pretrained_dir() / model).glob("*.pth.tar")
        return path

    @classmethod
    def load_pretrained(cls, model: str) -> nn.Module:
        cls.check_model_name(model)
        from chgnet.model import CHGNet

        with quiet():
            return CHGNet.load(model_name=model, use_device="cpu", verbose=False)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> nn.Module:
        cls.import_package()
        from chgnet.model import CHGNet

        try:
            with quiet():
                return CHGNet(**architecture)
        except TypeError as exc:
            raise BackendError(f"chgnet: cannot build CHGNet from {architecture}: {exc}") from None

    # ----------------------------------------------------------- model hooks
    @property
    def cutoff(self) -> float:
        return float(self.net.graph_converter.atom_graph_cutoff)

    @property
    def bond_cutoff(self) -> float:
        """Bonds shorter than this (A) form CHGNet's angles."""
        return float(self.net.graph_converter.bond_graph_cutoff)

    @property
    def species(self) -> tuple[int, ...]:
        return tuple(range(1, _MAX_Z + 1))

    def build_graph(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray) -> dict:
        """CHGNet's atom and bond graphs of one structure at the cutoffs plus the skin (local indices)."""
        i, j, shifts, d = neighbour_pairs(positions, cell, pbc, self.cutoff + self.skin)
        graph = self.net.graph_converter.create_graph(len(numbers), i, j, shifts, d)
        atom_graph, directed2undirected = graph.adjacency_list()
        bond_graph, undirected2directed = graph.line_graph_adjacency_list(cutoff=self.bond_cutoff + self.skin)
        return {
            "atom_graph": np.asarray(atom_graph, dtype=np.int64).reshape(-1, 2),
            "directed2undirected": np.asarray(directed2undirected, dtype=np.int64),
            "undirected2directed": np.asarray(undirected2directed, dtype=np.int64),
            "bond_graph": np.asarray(bond_graph, dtype=np.int64).reshape(-1, 5),
            "shifts": shifts,
            "numbers": numbers.astype(np.int64),
        }

    def assemble(self, graphs: list[dict], batch: Batch) -> dict[str, torch.Tensor]:
        """One graph of the whole batch: indices offset per structure, as CHGNet's ``BatchedGraph`` does."""
        atom = directed = undirected = 0
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ag", "d2u", "u2d", "bg", "shifts", "edge_owner")}
        for b, g in enumerate(graphs):
            parts["ag"].append(g["atom_graph"] + atom)
            parts["d2u"].append(g["directed2undirected"] + undirected)
            parts["u2d"].append(g["undirected2directed"] + directed)
            # angle rows: (atom, undirected bond, directed bond, undirected bond, directed bond)
            parts["bg"].append(g["bond_graph"] + np.array([atom, undirected, directed, undirected, directed]))
            parts["shifts"].append(g["shifts"])
            parts["edge_owner"].append(np.full(len(g["atom_graph"]), b, dtype=np.int64))
            atom += len(g["numbers"])
            directed += len(g["atom_graph"])
            undirected += len(g["undirected2directed"])
        device, dtype = batch.device, batch.dtype
        out = {k: torch.as_tensor(np.concatenate(v), device=device) for k, v in parts.items()}
        out["shifts"] = out["shifts"].to(dtype)
        return out

    def energy(self, batch: Batch, positions: torch.Tensor, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        from chgnet.model.model import BatchedGraph

        net = self.net
        flat = positions[batch.mask]  # real atoms, structure after structure
        owners = torch.nonzero(batch.mask)[:, 0]
        numbers = batch.numbers[batch.mask]
        shifts = torch.einsum("ei,eij->ej", graph["shifts"], batch.cell.to(flat.dtype)[graph["edge_owner"]])
        ag, d2u, u2d, bg = graph["ag"], graph["d2u"], graph["u2d"], graph["bg"]
        with torch.no_grad():
            length = torch.linalg.vector_norm(flat[ag[u2d, 1]] + shifts[u2d] - flat[ag[u2d, 0]], dim=1)
        # Drop the bonds and angles beyond the model's cutoffs (not differentiated; renumber the rest).
        keep_u = length < self.cutoff
        keep_d = keep_u[d2u]
        new_u = torch.cumsum(keep_u, 0) - 1
        new_d = torch.cumsum(keep_d, 0) - 1
        ag, shifts, d2u_kept = ag[keep_d], shifts[keep_d], new_u[d2u[keep_d]]
        u2d_kept = new_d[u2d[keep_u]]
        in_bond_graph = length < self.bond_cutoff
        bg = bg[in_bond_graph[bg[:, 1]] & in_bond_graph[bg[:, 3]]]
        eye = torch.eye(3, dtype=flat.dtype, device=flat.device)
        bases_ag, bases_bg, unit = net.bond_basis_expansion(
            center=flat[ag[:, 0]],
            neighbor=flat[ag[:, 1]] + shifts,
            undirected2directed=u2d_kept,
            image=torch.zeros_like(shifts),
            lattice=eye,
        )
        angles = net.angle_basis_expansion(unit[new_d[bg[:, 2]]], unit[new_d[bg[:, 4]]])
        fields: dict[str, Any] = dict(
            atomic_numbers=numbers,
            bond_bases_ag=bases_ag,
            bond_bases_bg=bases_bg,
            angle_bases=angles,
            batched_atom_graph=ag,
            batched_bond_graph=torch.stack([bg[:, 0], new_u[bg[:, 1]], new_u[bg[:, 3]]], dim=1),
            atom_owners=owners,
            directed2undirected=d2u_kept,
            atom_positions=[flat],
            strains=[None],
            volumes=torch.zeros(len(batch), dtype=flat.dtype, device=flat.device),
        )
        energy = net._compute(BatchedGraph(**fields))["e"]
        n_atoms = batch.n_atoms.to(energy.dtype)
        if net.is_intensive:  # CHGNet predicts eV/atom
            energy = energy * n_atoms
        if net.composition_model is not None:  # AtomRef: a fixed energy per element
            per_atom = net.composition_model.fc.weight[0, numbers - 1]
            energy = energy + torch.zeros_like(energy).index_add(0, owners, per_atom.to(energy.dtype))
        return energy

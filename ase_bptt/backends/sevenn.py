"""The SevenNet backend: SevenNet (``pip install 'ase-bptt[sevenn]'``) as an energy model of positions.

SevenNet-0 (NequIP-style, 843k parameters, 5 A cutoff) ships inside the
``sevenn`` wheel. Its pair list is built once per structure with the cutoff
plus the skin; every frame the edge vectors are recomputed from the positions
tensor and the pairs beyond the cutoff are dropped before the model sees them:
SevenNet's envelope (XPLOR) is not zero past its cutoff, so a skin without
that changed SevenNet-0's forces on a rattled 63-atom silicon cell by up to 0.92 eV/A. The model's own modules then run in order
up to the total energy, skipping its force module (``ConservativeForces``
differentiates the energy itself) and any edge preprocessing (the edge
vectors are ours). SevenNet's one-hot embedding is hard-wired to float32, so
every floating output is cast to the model's dtype (float64 works).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ase_bptt.backends.graph import neighbour_pairs
from ase_bptt.backends.registry import Backend, BackendError, quiet, register_backend
from ase_bptt.batch import Batch

__all__ = ["SevenNetBackend"]

#: Pretrained SevenNet models whose weights ship inside the sevenn wheel (single-fidelity ones).
_SHIPPED = ("7net-0", "7net-l3i5")
#: An untrained architecture's data statistics (SevenNet fits them to a training set): energy shift
#: (eV/atom), scale, and the convolution's denominator (about the neighbours per atom).
_UNTRAINED_STATISTICS = {"shift": 0.0, "scale": 1.0, "conv_denominator": 10.0}


def _skipped(module: nn.Module) -> bool:
    """SevenNet's force/stress modules (they differentiate the energy themselves) and edge preprocessing."""
    return hasattr(module, "get_grad_key") or type(module).__name__ == "EdgePreprocess"


@register_backend
class SevenNetBackend(Backend):
    """SevenNet as a :class:`~ase_bptt.backends.registry.Backend` (pretrained: ``7net-0``, ``7net-l3i5``)."""

    name = "sevenn"
    package = "sevenn"
    extra = "sevenn"
    default_model = "7net-0"
    # Floats one atom keeps per frame (SevenNet-0, float32), with gradients (BPTT) and without (a
    # relaxation): 2.4M on silicon (measured peak of a 10-frame BPTT step, benchmarks/bench_backends.py),
    # 1.8x that on rock-salt MgO; set 10% above MgO, the densest measured (docs/backends.md).
    memory_floats = (4_800_000, 2_500_000)
    small_architecture = {
        "chemical_species": ["Si", "C"],
        "cutoff": 4.0,
        "channel": 4,
        "lmax": 1,
        "num_convolution_layer": 2,
        "weight_nn_hidden_neurons": [8],
        "scale": 20.0,  # forces ~0.5 eV/A on silicon: relaxations move atoms past the skin
        "is_parity": False,
    }
    type_of: torch.Tensor

    def __init__(self, net: nn.Module, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if getattr(net, "modal_map", None):
            raise BackendError("sevenn: multi-fidelity SevenNet models are not supported; use 7net-0 or 7net-l3i5")
        self.net.set_is_batch_data(True)
        type_of = torch.full((max(self.net.type_map) + 1,), -1, dtype=torch.long)
        for z, t in self.net.type_map.items():
            type_of[z] = t
        self.register_buffer("type_of", type_of, persistent=False)

    # ------------------------------------------------------------ package hooks
    @classmethod
    def pretrained_names(cls) -> tuple[str, ...]:
        cls.import_package()
        import sevenn.util

        return tuple(n for n in _SHIPPED if Path(sevenn.util.pretrained_name_to_path(n)).is_file())

    @classmethod
    def weight_file(cls, model: str) -> Path:
        cls.check_model_name(model)
        import sevenn.util

        return Path(sevenn.util.pretrained_name_to_path(model))

    @classmethod
    def load_pretrained(cls, model: str) -> nn.Module:
        path = cls.weight_file(model)
        import sevenn.util

        with quiet():
            return sevenn.util.load_checkpoint(str(path)).build_model()

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> nn.Module:
        """SevenNet's defaults updated by ``architecture`` (its config keys, ``chemical_species`` a list of symbols).

        ``shift``, ``scale`` and ``conv_denominator`` default to numbers (0, 1, 10), since there is no
        training set to compute SevenNet's own defaults from.
        """
        cls.import_package()
        import sevenn._const
        import sevenn.util
        from sevenn.model_build import build_E3_equivariant_model

        settings = dict(architecture)
        species = settings.pop("chemical_species", None)
        if not species:
            raise BackendError("sevenn: an architecture needs 'chemical_species', e.g. ['Si']")
        config = copy.deepcopy(sevenn._const.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
        config.update(_UNTRAINED_STATISTICS)
        config.update(settings)
        config.update(sevenn.util.chemical_species_preprocess(list(species)))
        try:
            with quiet():
                return build_E3_equivariant_model(config)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"sevenn: cannot build SevenNet from {architecture}: {exc!r}") from None

    # ----------------------------------------------------------- model hooks
    @property
    def cutoff(self) -> float:
        return float(self.net.cutoff)

    @property
    def species(self) -> tuple[int, ...]:
        return tuple(sorted(int(z) for z in self.net.type_map))

    def build_graph(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray) -> dict:
        """Directed pairs of one structure within the cutoff plus the skin (local indices)."""
        i, j, shifts, _ = neighbour_pairs(positions, cell, pbc, self.cutoff + self.skin)
        return {"src": i, "dst": j, "shifts": shifts, "n": len(numbers)}

    def assemble(self, graphs: list[dict], batch: Batch) -> dict[str, torch.Tensor]:
        offsets = np.cumsum([0] + [g["n"] for g in graphs[:-1]])
        device = batch.device
        return {
            "src": torch.as_tensor(np.concatenate([g["src"] + o for g, o in zip(graphs, offsets)]), device=device),
            "dst": torch.as_tensor(np.concatenate([g["dst"] + o for g, o in zip(graphs, offsets)]), device=device),
            "shifts": torch.as_tensor(np.concatenate([g["shifts"] for g in graphs]), device=device).to(batch.dtype),
            "edge_owner": torch.as_tensor(
                np.concatenate([np.full(len(g["src"]), b, dtype=np.int64) for b, g in enumerate(graphs)]),
                device=device,
            ),
        }

    def energy(self, batch: Batch, positions: torch.Tensor, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        import sevenn._keys as KEY

        flat = positions[batch.mask]
        numbers = batch.numbers[batch.mask]
        shifts = torch.einsum("ei,eij->ej", graph["shifts"], batch.cell.to(flat.dtype)[graph["edge_owner"]])
        src, dst = graph["src"], graph["dst"]
        vectors = flat[dst] - flat[src] + shifts
        keep = torch.linalg.vector_norm(vectors.detach(), dim=1) < self.cutoff
        data: dict[str, Any] = {
            KEY.NODE_FEATURE: self.type_of.to(numbers.device)[numbers],
            KEY.ATOMIC_NUMBERS: numbers,
            KEY.EDGE_IDX: torch.stack([src[keep], dst[keep]]),
            KEY.EDGE_VEC: vectors[keep],
            KEY.BATCH: torch.nonzero(batch.mask)[:, 0],
            KEY.NUM_ATOMS: batch.n_atoms,
        }
        for module in self.net:
            if _skipped(module):
                continue
            data = module(data)
            for k, v in data.items():  # SevenNet's one-hot is always float32
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != flat.dtype:
                    data[k] = v.to(flat.dtype)
        return data[KEY.PRED_TOTAL_ENERGY]

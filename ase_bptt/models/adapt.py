"""ADAPT: a graph-free Transformer force model (Dramko et al. 2025), as in the paper.

Every atom is one token: coordinate features plus the standardised element
descriptors of :mod:`ase_bptt.elements`. A 3-layer embedding MLP (Eq. 6) maps
tokens to ``d_model``; ``n_layers`` post-norm encoder blocks (Eq. 4) let every
atom attend to every other real atom (padding is masked out of the keys); a
final LayerNorm and a linear projection (Eq. 5) give 3 force components per
atom. A second linear head gives a per-atom energy, summed over the real atoms,
so ASE's optimizers (which log energies) can drive the model.

Coordinate features (``ADAPTConfig.coordinates``):

* ``"cartesian"``: the paper's raw x, y, z (standardised by the training
  sample's mean and spread).
* ``"periodic"`` (default): the standardised Cartesian coordinates plus
  ``sin`` and ``cos`` of ``2 pi k s`` for every fractional coordinate ``s``
  and every ``k`` in ``frequencies``, so the model sees that an atom near
  one face of the cell neighbours the atoms near the opposite face. Along
  non-periodic directions those features are zero.

Why periodic is the default, measured on Stillinger-Weber silicon (matscipy): 240 training frames from 24
ASE-FIRE relaxations of rattled (0.1 A) 64-site vacancy cells, 60 validation
frames from 6 other relaxations; default config, Adam lr 1e-3, batch 16:

=============  =====================================================
coordinates    validation force MAE (eV/A), 600 / 2000 Adam steps
=============  =====================================================
predict zero   0.254 / 0.254
cartesian      0.258 / 0.256  (train 0.235: learns nothing useful)
periodic       0.192 / 0.193  (train 0.078)
=============  =====================================================

Reproduce with ``python -m studies.measure_coordinate_features 2000``.

Raw Cartesian coordinates do no better than predicting zero forces (as the
issue-7 prototype found), periodic features learn.

Net force removal (``remove_net_force``, default on): in a periodic cell the
forces sum to zero (Newton's third law, the interactions come in equal and
opposite pairs). A head that predicts each atom's force independently breaks
that, and a net force translates the whole cell a little at every relaxation
step; the relaxed structure then sits shifted, and Dq counts the rigid shift as
error (0.3-0.7 of the Dq in a prototype). So for fully periodic structures the
mean force over the real atoms is subtracted. Fixed atoms count in that mean
because they too exert and feel forces; with ``FixAtoms`` the movable atoms
alone may then carry a (physical) net force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.elements import MAX_Z, N_FEATURES, standardised_element_table
from ase_bptt.models.base import ForceModel, ModelConfig, ModelOutput, UnknownElementError

__all__ = ["ADAPTConfig", "ADAPT", "fit_output_standardisation"]

_COORDINATES = ("periodic", "cartesian")


@dataclass
class ADAPTConfig(ModelConfig):
    """Size and features of an ADAPT model (JSON-like via :meth:`to_dict`).

    Attributes:
        d_model: token width.
        d_ff: hidden width of each block's feed-forward network.
        n_layers: number of encoder blocks.
        n_heads: attention heads (must divide ``d_model``).
        dropout: dropout in attention and feed-forward (0 for relaxations).
        coordinates: ``"periodic"`` (default) or ``"cartesian"``.
        frequencies: the ``k`` of the periodic features ``sin/cos(2 pi k s)``.
        remove_net_force: subtract the mean force of fully periodic cells.
        species: atomic numbers the model was trained on, or None for any
            (:meth:`ADAPT.fit_standardisation` adds the elements it sees).
    """

    d_model: int = 64
    d_ff: int = 128
    n_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.0
    coordinates: str = "periodic"
    frequencies: tuple[int, ...] = (1, 2, 4, 8)
    remove_net_force: bool = True
    species: tuple[int, ...] | None = field(default=None)
    #: The name ``PretrainConfig.model["model_name"]`` and ``ase-bptt pretrain --model`` use.
    architecture: ClassVar[str] = "adapt"

    def __post_init__(self) -> None:
        self.frequencies = tuple(int(k) for k in self.frequencies)
        if self.species is not None:
            self.species = tuple(sorted({int(z) for z in self.species}))
        if self.coordinates not in _COORDINATES:
            raise ValueError(f"coordinates must be one of {_COORDINATES}, got {self.coordinates!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.coordinates == "periodic" and not self.frequencies:
            raise ValueError("periodic coordinates need at least one frequency")
        if self.species is not None and not all(1 <= z <= MAX_Z for z in self.species):
            raise ValueError(f"species must be atomic numbers 1..{MAX_Z}, got {self.species}")

    @property
    def n_inputs(self) -> int:
        """Width of a token before the embedding MLP."""
        n = 3 + N_FEATURES
        if self.coordinates == "periodic":
            n += 6 * len(self.frequencies)
        return n


def check_descriptor_range(numbers: torch.Tensor | list[int], where: str, descriptors: str) -> None:
    """Raise ``UnknownElementError`` for an element beyond the descriptor table (Z > 94); ADAPT and ADAPT-MI."""
    beyond = sorted({int(z) for z in torch.as_tensor(numbers).flatten().tolist() if int(z) > MAX_Z})
    if beyond:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] if z < len(chemical_symbols) else f"Z={z}" for z in beyond)
        raise UnknownElementError(f"{where} contains {names}; {descriptors} cover Z = 1..{MAX_Z} only")


def token_encoder(
    n_inputs: int, d_model: int, d_ff: int, n_heads: int, n_layers: int, dropout: float
) -> tuple[nn.Sequential, nn.ModuleList]:
    """The token embedding (the paper's 3-layer MLP, Eq. 6) and the encoder blocks, shared by ADAPT and ADAPT-MI."""
    embed = nn.Sequential(
        nn.Linear(n_inputs, d_model), nn.GELU(), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
    )
    return embed, nn.ModuleList(_EncoderBlock(d_model, d_ff, n_heads, dropout) for _ in range(n_layers))


class _EncoderBlock(nn.Module):
    """The paper's Eq. 4: ``H1 = LN(X + Attn(X)); H2 = FFN(LN(H1)); out = LN(H2 + H1)``."""

    def __init__(self, d_model: int, d_ff: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        a = self.out(a.transpose(1, 2).reshape(b, n, d))
        if self.dropout > 0:
            a = self.drop(a)
        h1 = self.norm1(x + a)
        lin1, act, drop, lin2 = self.ff
        h = act(lin1(self.norm2(h1)))
        if self.dropout > 0:  # skipping no-op modules saves Python overhead per frame
            h = self.drop(lin2(drop(h)))
        else:
            h = lin2(h)
        return self.norm3(h + h1)


class ADAPT(ForceModel):
    """ADAPT force model: ``forward(batch, positions=None) -> ModelOutput(forces, energy)``.

    The model runs in the dtype and on the device of its parameters (use
    ``model.to(device, dtype)``); the batch is cast to match. Forces are
    ``(B, N, 3)`` eV/A, zero on padding; energy is ``(B,)`` eV. Unknown
    elements are not checked here (that would synchronise a GPU every frame):
    callers check once with :meth:`check_species`, as the calculator does.

    Buffers (saved in the state dict, fitted by :meth:`fit_standardisation`):
    ``coord_mean``/``coord_std`` (A), ``force_scale`` (eV/A),
    ``energy_scale`` (eV per atom), ``energy_shift`` (eV per atom, per
    element, from a least-squares fit of total energies to composition), and
    ``elements``: the standardised descriptor table, stored so a checkpoint
    does not change when pymatgen's data does.
    """

    model_name = "ADAPT"
    # Buffers (registered in __init__), declared so type checkers know they are tensors.
    elements: torch.Tensor
    coord_mean: torch.Tensor
    coord_std: torch.Tensor
    force_scale: torch.Tensor
    energy_scale: torch.Tensor
    energy_shift: torch.Tensor
    _frequencies: torch.Tensor

    def __init__(self, config: ADAPTConfig | None = None) -> None:
        super().__init__()
        self.config = ADAPTConfig() if config is None else config
        c = self.config
        self.embed, self.blocks = token_encoder(c.n_inputs, c.d_model, c.d_ff, c.n_heads, c.n_layers, c.dropout)
        self.norm = nn.LayerNorm(c.d_model)
        self.force_head = nn.Linear(c.d_model, 3)
        self.energy_head = nn.Linear(c.d_model, 1)
        dtype = self.force_head.weight.dtype
        self.register_buffer("elements", standardised_element_table().to(dtype))
        self.register_buffer("coord_mean", torch.zeros(3, dtype=dtype))
        self.register_buffer("coord_std", torch.ones(3, dtype=dtype))
        self.register_buffer("force_scale", torch.ones((), dtype=dtype))
        self.register_buffer("energy_scale", torch.ones((), dtype=dtype))
        self.register_buffer("energy_shift", torch.zeros(MAX_Z + 1, dtype=dtype))
        # Not saved: it follows from the config. Integer k are exact in any
        # float dtype; 2 pi is applied in forward at the input's precision.
        self.register_buffer("_frequencies", torch.tensor(c.frequencies, dtype=dtype), persistent=False)

    # ------------------------------------------------------------- contract
    @property
    def species(self) -> tuple[int, ...] | None:  # type: ignore[override]
        return self.config.species

    @property
    def periodic_features(self) -> bool:  # type: ignore[override]
        return self.config.coordinates == "periodic"

    def check_species(self, numbers: torch.Tensor | list[int], where: str = "input") -> None:
        """Raise ``UnknownElementError`` for an untrained element, or one beyond Z = 94."""
        check_descriptor_range(numbers, where, "ADAPT's element descriptors")
        super().check_species(numbers, where=where)

    @classmethod
    def from_config(cls, config: dict) -> ADAPT:
        """Rebuild from :meth:`ADAPTConfig.to_dict` output (used by checkpoints)."""
        return cls(ADAPTConfig.from_dict(config))

    @staticmethod
    def _attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
        """``(B, 1, 1, N)`` key mask (queries attend to real atoms only), or None without padding.

        Without a mask ``scaled_dot_product_attention`` can use its fused kernels
        and skips the masking, with the same result. Deciding needs a host read
        of ``mask.all()``: free on CPU, a synchronisation on CUDA, so on CUDA the
        mask is always passed.
        """
        if mask.device.type == "cpu" and bool(mask.all()):
            return None
        return mask[:, None, None, :]

    def forward(self, batch: Batch, positions: torch.Tensor | None = None) -> ModelOutput:
        """Forces ``(B, N, 3)`` eV/A and energy ``(B,)`` eV for a Batch."""
        ref = self.force_head.weight
        batch = batch.to(device=ref.device, dtype=ref.dtype)
        pos = batch.positions if positions is None else positions.to(device=ref.device, dtype=ref.dtype)
        mask = batch.mask
        x = self.embed(self._tokens(batch, pos))
        attn_mask = self._attention_mask(mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        real = mask.unsqueeze(-1).to(x.dtype)
        forces = self.force_head(x) * self.force_scale * real
        if self.config.remove_net_force:
            forces = self._remove_net_force(forces, batch)
        per_atom = self.energy_head(x).squeeze(-1) * self.energy_scale + self.energy_shift[batch.numbers]
        energy = (per_atom * real.squeeze(-1)).sum(-1)
        return ModelOutput(forces=forces, energy=energy)

    # ------------------------------------------------------------ internals
    def _tokens(self, batch: Batch, pos: torch.Tensor) -> torch.Tensor:
        parts = [(pos - self.coord_mean) / self.coord_std]
        if self.config.coordinates == "periodic":
            pbc = batch.pbc
            # Non-periodic directions get zero periodic features (``on`` below).
            frac, _ = metrics.fractional(pos, batch.cell, pbc)
            phase = (2 * math.pi) * frac.unsqueeze(-1) * self._frequencies  # (B, N, 3, K)
            on = pbc[:, None, :, None].to(pos.dtype)
            parts += [(torch.sin(phase) * on).flatten(2), (torch.cos(phase) * on).flatten(2)]
        parts.append(self.elements[batch.numbers])
        return torch.cat(parts, dim=-1)

    @staticmethod
    def _remove_net_force(forces: torch.Tensor, batch: Batch) -> torch.Tensor:
        real = batch.mask.unsqueeze(-1).to(forces.dtype)
        n = real.sum(1, keepdim=True).clamp(min=1)
        mean = forces.sum(1, keepdim=True) / n
        periodic = batch.pbc.all(dim=1).to(forces.dtype)[:, None, None]
        return forces - mean * real * periodic

    # -------------------------------------------------------- standardisation
    @torch.no_grad()
    def fit_standardisation(self, batch: Batch, forces: torch.Tensor, energy: torch.Tensor | None = None) -> None:
        """Fit the input/output standardisation buffers to a sample of training frames.

        Args:
            batch: representative frames (a few hundred is plenty).
            forces: their reference forces, ``(B, N, 3)`` eV/A.
            energy: their total energies ``(B,)`` eV, or None (energy
                standardisation then stays at scale 1, shift 0).

        ``config.species`` becomes the union of its value and the elements in
        ``batch``: the model has now met them.
        """
        ref = self.force_head.weight
        batch = batch.to(device=ref.device, dtype=torch.float64)
        mask = batch.mask
        pos = batch.positions[mask]
        self.coord_mean.copy_(pos.mean(0))
        self.coord_std.copy_(pos.std(0, unbiased=False).clamp(min=1e-2) if pos.shape[0] > 1 else torch.ones(3))
        fit_output_standardisation(self, batch, forces, energy)
        seen = {int(z) for z in batch.numbers[mask].tolist()}
        self.config.species = tuple(sorted(seen | set(self.config.species or ())))


@torch.no_grad()
def fit_output_standardisation(
    model: nn.Module, batch: Batch, forces: torch.Tensor, energy: torch.Tensor | None
) -> None:
    """Fit the output buffers ``force_scale``, ``energy_shift`` and ``energy_scale`` of ``model``.

    Shared by every model with those buffers (ADAPT, :class:`~ase_bptt.models.mi_attention.MinImageADAPT`).
    ``batch`` is float64 on the model's device. The force scale is the RMS force component; the energy
    shift is a per-element least-squares fit of total energies to composition, the energy scale the
    RMS residual per sqrt(atom) (per-atom outputs of unit size sum to ~sqrt(N)). Without energies the
    energy buffers are left alone.
    """
    device = batch.positions.device
    mask = batch.mask
    f = forces.to(device=device, dtype=torch.float64)[mask]
    cast(torch.Tensor, model.force_scale).copy_(f.pow(2).mean().sqrt().clamp(min=1e-3))
    if energy is None:
        return
    energy = energy.to(device=device, dtype=torch.float64)
    species = sorted({int(z) for z in batch.numbers[mask].tolist()})
    counts = torch.stack([(batch.numbers == z).sum(1) for z in species], dim=1).to(torch.float64)
    shift = torch.linalg.lstsq(counts, energy.unsqueeze(-1), driver="gelsd" if counts.device.type == "cpu" else None)
    shift = shift.solution.squeeze(-1)
    table = torch.zeros(MAX_Z + 1, dtype=torch.float64, device=device)
    table[species] = shift
    residual = energy - counts @ shift
    n = batch.n_atoms.to(torch.float64)
    scale = (residual.pow(2) / n).mean().sqrt().clamp(min=1e-3)
    cast(torch.Tensor, model.energy_shift).copy_(table)
    cast(torch.Tensor, model.energy_scale).copy_(scale)

"""MinImageADAPT ("adapt-mi"): ADAPT's Transformer over neighbour pairs, exactly translation invariant.

ADAPT describes every atom by its absolute position (standardised Cartesian
coordinates and sin/cos of its fractional coordinates), so it has to learn the
same local physics separately at every place in the cell; with defects at
random sites it barely improves interstitials even on its training split. This
variant never sees an absolute coordinate:

* Tokens: the standardised element descriptors of :mod:`ase_bptt.elements`
  plus invariant descriptors of the atom's neighbourhood (per radial basis
  function: the radial density and the norms of the dipole and traceless
  quadrupole of the neighbour directions, i.e. two- and three-body terms),
  standardised, embedded by ADAPT's 3-layer MLP to ``d_model``. Element
  descriptors alone give every atom of a one-element structure the same token;
  attention then averages identical values, and the model would be a mere pair
  potential.
* Pairs: every periodic image of every atom within the cutoff, as graph MLIPs
  count them: the displacement ``r_ijs = x_j + s . cell - x_i`` for each integer
  image shift ``s`` (plain differences along non-periodic directions), its length
  ``d_ijs``, ``n_rbf`` Gaussian radial basis functions on ``[0, cutoff]`` times the
  cosine envelope ``c(d) = (1 + cos(pi d / cutoff)) / 2`` (0 beyond the cutoff).
* ``n_layers`` of ADAPT's post-norm encoder blocks; attention logits get a
  per-head bias, a linear map of the pair's RBF features, plus ``log c(d_ij)``:
  an atom attends to itself and to the real atoms within the cutoff, and a
  neighbour's weight goes smoothly to zero as it leaves the cutoff (a hard
  mask would make the forces jump).
* Forces: ``F_i = sum_js s_ijs r_ijs / d_ijs`` with the symmetric pair strength
  ``s_ijs = c(d_ijs) (g(h_i, h_j, e_ijs) + g(h_j, h_i, e_ijs))``, ``g`` a small MLP
  to a scalar and ``e_ij`` the pair's envelope-weighted RBF features. Pair
  forces are equal and opposite (Newton's third law), so the net force of a
  periodic cell is zero up to rounding (no net-force removal needed); the
  forces rotate with the structure and ignore translations exactly.
* Energy: a per-atom linear head summed over the real atoms (as ADAPT), so ASE
  optimisers can log energies. Forces are not its gradient.

Images: rounding fractional differences finds each pair's minimum image; a cell
whose height ``h`` along a periodic direction is below twice the cutoff needs the
shifts ``|s_k| <= floor(cutoff / h_k + 1/2)`` besides (:func:`image_shifts`), e.g.
the 3 x 3 in-plane shifts of a 72-atom 3x3x2 wurtzite supercell (heights 8.3 A).
Cells more than twice the cutoff high (the built-in 64-site silicon, 10.9 A, and
108-site Cu cells, 10.8 A) need the minimum image only, and then the pair tensors
have no image axis to speak of (S = 1): the same numbers as before images were
counted. The shifts depend on the cell alone, so they are found once per batch
(a host read) and reused for every frame of a relaxation.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.elements import MAX_Z, N_FEATURES, standardised_element_table
from ase_bptt.models.adapt import check_descriptor_range, fit_output_standardisation, token_encoder
from ase_bptt.models.base import ForceModel, ModelConfig, ModelOutput

__all__ = ["MinImageADAPTConfig", "MinImageADAPT", "cell_heights", "image_shifts", "reciprocal_cell"]


#: Largest ``(d - mu)^2 / w^2`` the radial basis evaluates (see ``_pairs``).
_MAX_EXPONENT = 60.0


@dataclass
class MinImageADAPTConfig(ModelConfig):
    """Size of a :class:`MinImageADAPT` model (JSON-like via :meth:`to_dict`).

    Attributes:
        d_model: token width.
        d_ff: hidden width of each block's feed-forward network.
        n_layers: number of encoder blocks.
        n_heads: attention heads (must divide ``d_model``).
        dropout: dropout in attention and feed-forward (0 for relaxations).
        cutoff: pair cutoff (A); every periodic image within it counts.
        n_rbf: Gaussian radial basis functions on ``[0, cutoff]``.
        d_pair: hidden width of the pair-force MLP ``g``.
        species: atomic numbers the model was trained on, or None for any.
    """

    d_model: int = 64
    d_ff: int = 128
    n_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.0
    cutoff: float = 5.0
    n_rbf: int = 16
    d_pair: int = 32
    species: tuple[int, ...] | None = field(default=None)
    #: The name ``PretrainConfig.model["model_name"]`` and ``ase-bptt pretrain --model`` use.
    architecture: ClassVar[str] = "adapt-mi"

    def __post_init__(self) -> None:
        self.cutoff = float(self.cutoff)
        if self.species is not None:
            self.species = tuple(sorted({int(z) for z in self.species}))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not self.cutoff > 0:
            raise ValueError(f"cutoff must be positive (A), got {self.cutoff}")
        if self.n_rbf < 2:
            raise ValueError(f"n_rbf must be at least 2, got {self.n_rbf}")
        if self.species is not None and not all(1 <= z <= MAX_Z for z in self.species):
            raise ValueError(f"species must be atomic numbers 1..{MAX_Z}, got {self.species}")

    @property
    def n_inputs(self) -> int:
        """Width of a token before the embedding MLP: element descriptors, 3 geometry invariants per RBF."""
        return N_FEATURES + 3 * self.n_rbf


def reciprocal_cell(cell: torch.Tensor, pbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(safe_cell, inverse)``, both ``(B, 3, 3)``: ``frac = x @ inverse`` and ``x = frac @ safe_cell``.

    Non-periodic rows are replaced by unit vectors, as in :func:`ase_bptt.metrics.fractional`;
    the inverse comes from cross products (column ``k`` is ``a_{k+1} x a_{k+2} / V``), not from a
    LAPACK solve: a few elementwise operations, no thread pool, no host synchronisation on CUDA.
    """
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    safe = torch.where(pbc.unsqueeze(-1), cell, eye)
    crosses = torch.stack([torch.cross(safe[:, (k + 1) % 3], safe[:, (k + 2) % 3], dim=-1) for k in range(3)], dim=-1)
    volume = (safe[:, 0] * crosses[..., 0]).sum(-1)  # a_0 . (a_1 x a_2)
    return safe, crosses / volume[:, None, None]


def cell_heights(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Distance between opposite faces of each cell, ``(B, 3)`` A; ``inf`` along non-periodic directions.

    Height ``k`` is ``1 / |b_k|``, ``b_k`` the reciprocal vector (column ``k`` of the inverse cell).
    """
    _, inverse = reciprocal_cell(cell, pbc)
    heights = 1.0 / torch.linalg.vector_norm(inverse, dim=-2)
    return torch.where(pbc, heights, torch.full_like(heights, math.inf))


def image_shifts(cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The integer image shifts ``(S, 3)`` that, added to minimum-image differences, reach every image
    of every atom within ``cutoff`` (A) in each cell of the batch.

    After rounding, a fractional difference ``f_k`` lies in ``[-1/2, 1/2]``; an image ``f_k + s_k``
    is at least ``|f_k + s_k| h_k`` away (``h_k`` the height), so ``|s_k| <= floor(cutoff / h_k + 1/2)``
    suffices. Ordered lexicographically over symmetric ranges, so row ``S - 1 - k`` is minus row
    ``k`` and the zero shift is row ``S // 2``; ``S = 1`` (the zero shift) when every cell is more
    than twice the cutoff high.
    """
    heights = cell_heights(cell.detach().to(torch.float64), pbc)
    reach = torch.floor(cutoff / heights + 0.5).amax(dim=0) if len(heights) else torch.zeros(3)
    n = [int(k) for k in torch.nan_to_num(reach, nan=0.0, posinf=0.0).tolist()]
    axes = [torch.arange(-k, k + 1, dtype=torch.float64) for k in n]
    return torch.cartesian_prod(*axes).reshape(-1, 3)


class _Pairs(NamedTuple):
    """Pair geometry over atoms ``i``, image shifts ``s`` and atoms ``j``: every tensor ``(B, N, S, N, ...)``.

    ``unit``: ``r_ijs / d_ijs`` (zero on the self slot and on padding); ``envelope``: ``c(d_ijs)``
    (1 on the self slot); ``rbf``: the RBFs times the envelope (zero for masked pairs, ``rbf(0)`` on the
    self slot); ``pair``: two real atoms, not an atom with itself under the zero shift; ``self_slot``
    ``(N, S, N)``: ``i == j`` under the zero shift (row ``S // 2`` of :func:`image_shifts`).
    """

    unit: torch.Tensor
    envelope: torch.Tensor
    rbf: torch.Tensor
    pair: torch.Tensor
    self_slot: torch.Tensor


class MinImageADAPT(ForceModel):
    """Translation-invariant ADAPT variant: ``forward(batch, positions=None) -> ModelOutput(forces, energy)``.

    Same contract as :class:`~ase_bptt.models.adapt.ADAPT`: runs in the dtype
    and on the device of its parameters (the batch is cast to match); forces
    ``(B, N, 3)`` eV/A, zero on padding; energy ``(B,)`` eV; unknown elements
    are checked by callers with :meth:`check_species`.

    Buffers (saved in the state dict, fitted by :meth:`fit_standardisation`):
    ``geometry_mean``/``geometry_std`` (of the neighbourhood descriptors),
    ``force_scale`` (eV/A), ``energy_scale`` (eV per atom), ``energy_shift``
    (eV per atom, per element) and ``elements`` (the descriptor table). There
    is no coordinate standardisation: the model sees no coordinates.
    """

    model_name = "ADAPT-MI"
    elements: torch.Tensor
    geometry_mean: torch.Tensor
    geometry_std: torch.Tensor
    force_scale: torch.Tensor
    energy_scale: torch.Tensor
    energy_shift: torch.Tensor
    _centres: torch.Tensor

    def __init__(self, config: MinImageADAPTConfig | None = None) -> None:
        super().__init__()
        self.config = MinImageADAPTConfig() if config is None else config
        c = self.config
        self.embed, self.blocks = token_encoder(c.n_inputs, c.d_model, c.d_ff, c.n_heads, c.n_layers, c.dropout)
        self.pair_bias = nn.Linear(c.n_rbf, c.n_heads * c.n_layers)  # every layer's per-head bias at once
        self.norm = nn.LayerNorm(c.d_model)
        # g([h_i, h_j, e_ij]) = w . silu(A h_i + B h_j + C e_ij + b): the first layer split by input,
        # so the (B, N, N, 2 d_model + n_rbf) concatenation is never built.
        self.pair_i = nn.Linear(c.d_model, c.d_pair)
        self.pair_j = nn.Linear(c.d_model, c.d_pair, bias=False)
        self.pair_rbf = nn.Linear(c.n_rbf, c.d_pair, bias=False)
        self.pair_out = nn.Linear(c.d_pair, 1)
        self.energy_head = nn.Linear(c.d_model, 1)
        dtype = self.energy_head.weight.dtype
        self.register_buffer("elements", standardised_element_table().to(dtype))
        self.register_buffer("geometry_mean", torch.zeros(3 * c.n_rbf, dtype=dtype))
        self.register_buffer("geometry_std", torch.ones(3 * c.n_rbf, dtype=dtype))
        self.register_buffer("force_scale", torch.ones((), dtype=dtype))
        self.register_buffer("energy_scale", torch.ones((), dtype=dtype))
        self.register_buffer("energy_shift", torch.zeros(MAX_Z + 1, dtype=dtype))
        # Not saved: it follows from the config.
        self.register_buffer("_centres", torch.linspace(0.0, c.cutoff, c.n_rbf, dtype=dtype), persistent=False)
        # The image shifts of the last cell tensor seen: a relaxation reuses one Batch, so finding
        # them (a host read, a synchronisation on CUDA) happens once per rollout, not per frame.
        self._shifts_of: tuple[weakref.ref, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shifts_of"] = None  # a weak reference does not pickle
        return state

    # ------------------------------------------------------------- contract
    @property
    def species(self) -> tuple[int, ...] | None:  # type: ignore[override]
        return self.config.species

    def check_species(self, numbers: torch.Tensor | list[int], where: str = "input") -> None:
        """Raise ``UnknownElementError`` for an untrained element, or one beyond Z = 94."""
        check_descriptor_range(numbers, where, f"the element descriptors of {self.model_name}")
        super().check_species(numbers, where=where)

    @classmethod
    def from_config(cls, config: dict) -> MinImageADAPT:
        """Rebuild from :meth:`MinImageADAPTConfig.to_dict` output (used by checkpoints)."""
        return cls(MinImageADAPTConfig.from_dict(config))

    def image_shifts(self, batch: Batch) -> torch.Tensor:
        """:func:`image_shifts` of the batch's cells for this model's cutoff (cached per cell tensor)."""
        cell = batch.cell
        if self._shifts_of is None or self._shifts_of[0]() is not cell:
            shifts = image_shifts(cell, batch.pbc, self.config.cutoff)
            self._shifts_of = (weakref.ref(cell), shifts.to(device=cell.device))
        return self._shifts_of[1]

    def forward(self, batch: Batch, positions: torch.Tensor | None = None) -> ModelOutput:
        """Forces ``(B, N, 3)`` eV/A and energy ``(B,)`` eV for a Batch."""
        ref = self.energy_head.weight
        batch = batch.to(device=ref.device, dtype=ref.dtype)
        pos = batch.positions if positions is None else positions.to(device=ref.device, dtype=ref.dtype)
        mask = batch.mask
        pairs = self._pairs(batch, pos)
        geometry = (self._geometry(pairs.unit, pairs.rbf) - self.geometry_mean) / self.geometry_std
        x = self.embed(torch.cat([self.elements[batch.numbers], geometry], dim=-1))
        logits, heads = self._attention_logits(pairs), self.config.n_heads
        for k, block in enumerate(self.blocks):
            x = block(x, logits[:, k * heads : (k + 1) * heads])
        x = self.norm(x)
        real = mask.unsqueeze(-1).to(x.dtype)
        forces = self._pair_forces(x, pairs) * self.force_scale * real
        per_atom = self.energy_head(x).squeeze(-1) * self.energy_scale + self.energy_shift[batch.numbers]
        energy = (per_atom * real.squeeze(-1)).sum(-1)
        return ModelOutput(forces=forces, energy=energy)

    def _attention_logits(self, pairs: _Pairs) -> torch.Tensor:
        """Every layer's attention biases ``(B, heads x layers, N, N)`` from the pair geometry.

        An atom attends to itself and to the real atoms within the cutoff, weighted by the envelope
        (log c -> -inf at the cutoff); padding atoms attend to themselves only, so no row is all
        -inf. The biases of all layers come from one linear map, masked once. The images of atom j
        share its token, so they are one key whose bias is the log-sum-exp of theirs.
        """
        open_ = ((pairs.pair & (pairs.envelope > 0)) | pairs.self_slot).unsqueeze(-1)
        logits = self.pair_bias(pairs.rbf) + torch.log(torch.where(open_, pairs.envelope.unsqueeze(-1), 1.0))
        if logits.shape[2] == 1:
            logits = torch.where(open_, logits, -math.inf).squeeze(2)
        else:
            # A closed slot must not reach the backward of exp or log (exp(-inf + inf) is NaN), so the
            # sum runs over open slots only, shifted by their (constant) maximum.
            any_open = open_.any(dim=2)
            top = torch.where(open_, logits, -math.inf).amax(dim=2, keepdim=True).detach()
            top = torch.where(any_open.unsqueeze(2), top, torch.zeros_like(top))
            total = torch.exp(torch.where(open_, logits - top, -math.inf)).sum(2)
            lse = torch.log(torch.where(any_open, total, torch.ones_like(total))) + top.squeeze(2)
            logits = torch.where(any_open, lse, -math.inf)
        return logits.permute(0, 3, 1, 2).contiguous()

    def _pair_forces(self, x: torch.Tensor, pairs: _Pairs) -> torch.Tensor:
        """``sum_js s_ijs r_ijs / d_ijs`` ``(B, N, 3)``, before ``force_scale``, from the final tokens ``x``."""
        # g for every ordered pair and image: silu(C e_ijs + B h_j + A h_i + b), in place on the linear
        # output (the linear map's backward needs its input, not its output).
        hidden = self.pair_rbf(pairs.rbf)
        hidden += self.pair_j(x)[:, None, None]
        hidden += self.pair_i(x)[:, :, None, None]
        g = self.pair_out(F.silu(hidden)).squeeze(-1)
        # The reverse of pair (i, j, s) is (j, i, -s), and shift -s is row S - 1 - s.
        strength = (g + g.flip(2).permute(0, 3, 2, 1)) * pairs.envelope * pairs.pair.to(g.dtype)
        return (strength.unsqueeze(-1) * pairs.unit).sum((2, 3))

    @torch.no_grad()
    def neighbourhood_descriptors(self, batch: Batch, positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The invariant neighbourhood descriptors of :meth:`_geometry`, before standardisation: one
        ``(n_atoms, 3 n_rbf)`` tensor per structure (real atoms only), float64 on the model's device.

        What the tokens see of each atom's surroundings, without the element; evaluated 16 structures
        at a time (the pair tensors grow with N^2).
        """
        batch = batch.to(device=self.energy_head.weight.device, dtype=torch.float64)
        pos = batch.positions if positions is None else positions.to(batch.positions)
        out: list[torch.Tensor] = []
        for chunk in torch.arange(len(batch)).split(16):
            sub = batch.select(chunk)
            pairs = self._pairs(sub, pos[chunk.to(pos.device), : sub.positions.shape[1]])
            geometry = self._geometry(pairs.unit, pairs.rbf)
            out += [geometry[k][sub.mask[k]] for k in range(len(chunk))]
        return out

    # ------------------------------------------------------------ internals
    def _pairs(self, batch: Batch, pos: torch.Tensor) -> _Pairs:
        """The pair geometry of every atom with every image of every atom within the cutoff (:class:`_Pairs`)."""
        mask = batch.mask
        n = mask.shape[1]
        shifts = self.image_shifts(batch).to(pos.dtype)
        n_images = len(shifts)
        # Fractional coordinates once per atom, not once per pair: the integer image shift of a
        # pair rounds the difference of fractional coordinates; the other images add integer shifts.
        safe_cell, inverse = reciprocal_cell(batch.cell, batch.pbc)
        frac = pos @ inverse
        dfrac = frac.unsqueeze(1) - frac.unsqueeze(2)
        nearest = torch.where(batch.pbc[:, None, None, :], torch.round(dfrac), torch.zeros_like(dfrac))
        r = (pos.unsqueeze(1) - pos.unsqueeze(2)) - (nearest.flatten(1, 2) @ safe_cell).view_as(nearest)
        r = r.unsqueeze(2)  # (B, N, 1, N, 3): one image
        self_slot = torch.zeros(n, n_images, n, dtype=torch.bool, device=mask.device)
        self_slot[:, n_images // 2] = torch.eye(n, dtype=torch.bool, device=mask.device)
        pair = mask[:, :, None, None] & mask[:, None, None, :] & ~self_slot
        if n_images > 1:
            r = r + (shifts @ safe_cell)[:, None, :, None, :]
            # A shift along a direction some structure is not periodic in is not an image of it.
            real_image = ((shifts == 0) | batch.pbc[:, None, :]).all(-1)  # (B, S)
            pair = pair & real_image[:, None, :, None]
        sq = (r * r).sum(-1)
        ok = pair & (sq > 0)
        # where() before sqrt: a zero distance (self, padding at the origin) keeps a finite gradient.
        d = torch.where(ok, torch.sqrt(torch.where(ok, sq, torch.ones_like(sq))), torch.zeros_like(sq))
        unit = r / torch.where(ok, d, torch.ones_like(d)).unsqueeze(-1) * ok.unsqueeze(-1).to(r.dtype)
        cutoff = self.config.cutoff
        inside = d < cutoff
        envelope = torch.where(inside, 0.5 * (1.0 + torch.cos((math.pi / cutoff) * d)), torch.zeros_like(d))
        envelope = torch.where(pair, envelope, self_slot.to(d.dtype).expand_as(d))
        # Gaussians of width = spacing of the centres, exp(-(d / w - mu / w)^2), in few passes. The
        # exponent stops at -60 (exp(-60) ~ 1e-26, not 0): far tails would be denormal float32
        # numbers, and arithmetic on those runs ~10x slower on x86 CPUs (measured: the whole forward).
        inv_width = (self.config.n_rbf - 1) / cutoff
        z = torch.square(d.unsqueeze(-1) * inv_width - self._centres * inv_width)
        rbf = torch.exp(z.clamp(max=_MAX_EXPONENT).neg_())
        # The envelope is 0 for padding and far pairs and 1 on the self slot: rbf(0) there.
        return _Pairs(unit, envelope, rbf * envelope.unsqueeze(-1), pair, self_slot)

    @staticmethod
    def _geometry(unit: torch.Tensor, rbf: torch.Tensor) -> torch.Tensor:
        """Invariant descriptors of each atom's neighbourhood, ``(B, N, 3 n_rbf)``, from the
        :class:`_Pairs` tensors ``unit`` ``(B, N, S, N, 3)`` and ``rbf`` ``(B, N, S, N, n_rbf)``.

        Per RBF channel ``k``: the radial density ``rho = sum_j e_ij``, the squared dipole
        ``|sum_j e_ij u_ij|^2`` and the squared traceless quadrupole of ``sum_j e_ij u_ij u_ij^T``
        (``u`` the unit pair vectors), each through ``log1p``. The dipole and quadrupole norms are the
        l = 1 and l = 2 three-body sums ``sum_jk e_ij e_ik P_l(cos theta_jik)`` (up to constants),
        the angular terms of Stillinger-Weber-like potentials. Without them every atom of a
        one-element structure would get the same token, attention would average identical values,
        and the model would reduce to a pair potential.
        """
        unit, rbf = unit.flatten(2, 3), rbf.flatten(2, 3)  # every image of every neighbour: one axis
        x, y, z = unit.unbind(-1)
        # The six independent components of u u^T, off-diagonals weighted so that the sum of
        # squares below is the Frobenius norm.
        root2 = math.sqrt(2.0)
        parts = torch.stack([x, y, z, x * x, y * y, z * z, root2 * x * y, root2 * x * z, root2 * y * z], dim=-1)
        moments = torch.einsum("bijk,bijc->bikc", rbf, parts)  # (B, N, K, 9)
        dipole = moments[..., :3].square().sum(-1)
        second = moments[..., 3:]
        trace = second[..., :3].sum(-1)
        quadrupole = second.square().sum(-1) - trace.square() / 3.0
        # The diagonal (self) RBF adds the constant rbf(0) to rho and nothing to the moments (u_ii = 0).
        rho = rbf.sum(2)
        return torch.log1p(torch.cat([rho, dipole, quadrupole.clamp(min=0.0)], dim=-1))

    # -------------------------------------------------------- standardisation
    @torch.no_grad()
    def fit_standardisation(self, batch: Batch, forces: torch.Tensor, energy: torch.Tensor | None = None) -> None:
        """Fit the standardisation buffers to a sample of training frames (as ADAPT's, descriptors for coordinates).

        Args:
            batch: representative frames (a few hundred is plenty).
            forces: their reference forces, ``(B, N, 3)`` eV/A.
            energy: their total energies ``(B,)`` eV, or None (energy
                standardisation then stays at scale 1, shift 0).

        ``config.species`` becomes the union of its value and the elements in ``batch``.
        """
        ref = self.energy_head.weight
        batch = batch.to(device=ref.device, dtype=torch.float64)
        geometry = torch.cat(self.neighbourhood_descriptors(batch))
        self.geometry_mean.copy_(geometry.mean(0))
        if len(geometry) > 1:
            self.geometry_std.copy_(geometry.std(0, unbiased=False).clamp(min=1e-2))
        fit_output_standardisation(self, batch, forces, energy)
        seen = {int(z) for z in batch.numbers[batch.mask].tolist()}
        self.config.species = tuple(sorted(seen | set(self.config.species or ())))

"""DifferentiableRelaxer: batched relaxations in torch that gradients flow through.

``rollout`` is the functional core used by training: it unrolls frames
``X[t+1] = X[t] + update(F_theta(X[t]))`` for a whole Batch and returns the
final positions with their autograd graph. ``DifferentiableRelaxer`` wraps the
same frame in the interface of ``ase.optimize.Optimizer`` (``run``, ``irun``,
``step``, ``attach``, log and trajectory files), so an ASE user knows it at
sight.

Stopping, per structure: after a frame whose update has an RMS per-atom
displacement below ``tol`` (the paper's rule), when the largest force on a
movable atom is below ``fmax`` (if given; checked before the frame's update,
as ASE does), or after ``max_steps`` frames. Decisions are taken on detached
values and never differentiated; a stopped structure is frozen with
``torch.where``, and fixed and padding atoms never move.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.batch import Batch
from ase_bptt.metrics import max_force, rms_displacement
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_TOL
from ase_bptt.relax.recompute import recompute, segment_length, trainable_parameters
from ase_bptt.relax.steps import State, StepRule, make_step_rule, rule_from_relax_settings

__all__ = ["RolloutResult", "rollout", "DifferentiableRelaxer", "DEFAULT_TOL", "DEFAULT_MAX_STEPS"]


class RolloutResult(NamedTuple):
    """What :func:`rollout` returns.

    Attributes:
        positions: ``(B, N, 3)`` final positions (differentiable).
        n_frames: ``(B,)`` long, the number of updates each structure took.
        converged: ``(B,)`` bool, stopped by ``tol`` or ``fmax`` (not by ``max_steps``).
    """

    positions: torch.Tensor
    n_frames: torch.Tensor
    converged: torch.Tensor


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and device of a model's parameters (float64 on CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float64, torch.device("cpu")


def _where_movable(move: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(move, x, torch.zeros_like(x))


def _frame(
    model: torch.nn.Module,
    batch: Batch,
    rule: StepRule,
    frame: int,
    tol: float | None,
    fmax: float | None,
    positions: torch.Tensor,
    state: State,
    active: torch.Tensor,
    converged: torch.Tensor,
    n_frames: torch.Tensor,
    noise: torch.Tensor | None,
    forces: torch.Tensor | None = None,
):
    """One frame for the whole batch; returns ``(positions, state, active, converged, n_frames)``."""
    movable = batch.movable[..., None]
    if forces is None:
        forces = model(batch, positions=positions).forces
    # ASE applies FixAtoms to forces before any optimizer sees them; so do we.
    forces = _where_movable(movable, forces)
    if fmax is not None:
        small = max_force(forces.detach(), batch) < fmax
        converged = converged | (active & small)
        active = active & ~small
    update, state = rule(positions, forces, batch, state, frame, noise=noise)
    move = active[:, None, None] & movable
    update = _where_movable(move, update)
    positions = torch.where(move, positions + update, positions)
    n_frames = n_frames + active.long()
    if tol is not None:
        small = rms_displacement(update.detach(), batch) < tol
        converged = converged | (active & small)
        active = active & ~small
    return positions, state, active, converged, n_frames


def _draw_noise(rule: StepRule, positions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    # Drawn outside any checkpointed region, so the recomputation in backward
    # sees the same numbers whatever generator is used.
    if not rule.wants_noise:
        return None
    return torch.randn(positions.shape, generator=generator, dtype=positions.dtype, device=positions.device)


def _segment(
    model: torch.nn.Module,
    batch: Batch,
    rule: StepRule,
    start: int,
    stop: int,
    tol: float | None,
    fmax: float | None,
    keys: tuple[str, ...],
    out_keys: list[str],
    positions: torch.Tensor,
    active: torch.Tensor,
    converged: torch.Tensor,
    n_frames: torch.Tensor,
    noise: torch.Tensor | None,
    *state_values: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Frames ``start .. stop-1`` as one flat function of tensors (what :func:`recompute` wraps).

    ``noise`` is None or ``(stop - start, B, N, 3)``, drawn outside so that the
    recomputation replays the same numbers. A structure that stops inside the
    segment is frozen by ``_frame``'s masks for the rest of it.
    """
    state = dict(zip(keys, state_values))
    for i, frame in enumerate(range(start, stop)):
        positions, state, active, converged, n_frames = _frame(
            model,
            batch,
            rule,
            frame,
            tol,
            fmax,
            positions,
            state,
            active,
            converged,
            n_frames,
            None if noise is None else noise[i],
        )
    out_keys[:] = list(state)
    return (positions, active, converged, n_frames, *state.values())


class _LaggedFlag:
    """Reads "is any structure still moving?" one frame late on CUDA.

    A host read of the current frame's flag would drain the GPU queue every
    frame. Reading the previous frame's flag (copied asynchronously) keeps one
    frame queued; the price is at most one extra frame in which every
    structure is already frozen, which changes no number.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: tuple[torch.Tensor, Any] | None = None

    def any_moving(self, flag: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(flag)
        previous = self.pending
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (host, event)
        if previous is None:
            return True
        previous[1].synchronize()
        return bool(previous[0])


class _Compactor:
    """Drops stopped structures from a rollout's working batch (no_grad on CPU only).

    A stopped structure is frozen but, kept in the batch, still costs a model
    evaluation every frame; without gradients nothing needs its graph, so it is
    written back to full-size results and removed. Only where the numbers stay
    the same: no exploration noise (its draw depends on the batch shape), and on
    CPU, where reading which structures stopped costs no device synchronisation.
    Each structure's frames do not depend on its batch mates, so the results
    equal the uncompacted run's (up to summation order in the model).
    """

    @staticmethod
    def applies(rule: StepRule, device: torch.device) -> bool:
        return not torch.is_grad_enabled() and device.type == "cpu" and not rule.wants_noise

    def __init__(self, positions: torch.Tensor, converged: torch.Tensor, n_frames: torch.Tensor) -> None:
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self.positions, self.converged, self.n_frames = positions.clone(), converged.clone(), n_frames.clone()

    def _write_back(self, positions: torch.Tensor, converged: torch.Tensor, n_frames: torch.Tensor) -> None:
        self.positions[self.rows] = positions
        self.converged[self.rows] = converged
        self.n_frames[self.rows] = n_frames

    def drop_stopped(
        self,
        batch: Batch,
        positions: torch.Tensor,
        state: State,
        active: torch.Tensor,
        converged: torch.Tensor,
        n_frames: torch.Tensor,
    ):
        self._write_back(positions, converged, n_frames)
        keep = torch.nonzero(active).squeeze(1)
        self.rows = self.rows[keep]
        return (
            batch.select(keep),
            positions[keep],
            {k: v[keep] for k, v in state.items()},
            active[keep],
            converged[keep],
            n_frames[keep],
        )

    def result(self, positions: torch.Tensor, converged: torch.Tensor, n_frames: torch.Tensor) -> RolloutResult:
        self._write_back(positions, converged, n_frames)
        return RolloutResult(self.positions, self.n_frames, self.converged)


def rollout(
    model: torch.nn.Module,
    batch: Batch,
    step_rule: StepRule,
    *,
    tol: float | None = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    fmax: float | None = None,
    checkpoint_frames: bool | int = False,
    generator: torch.Generator | None = None,
    sync_active: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RolloutResult:
    """Unroll a relaxation of every structure in ``batch``, keeping the autograd graph.

    Args:
        model: a ForceModel, ``model(batch, positions=X).forces``.
        batch: the initial structures (cast to the model's dtype and device).
        step_rule: the update rule (its state starts fresh).
        tol: stop a structure after a frame whose RMS per-atom displacement
            is below ``tol`` (A); None disables the rule.
        max_steps: most frames per structure.
        fmax: also stop a structure once its largest force is below ``fmax`` (eV/A).
        checkpoint_frames: trade time for memory while gradients are enabled.
            False: keep every frame's graph (naive BPTT). True: run the frames
            in segments of round(sqrt(max_steps)) frames, each under no_grad,
            keeping only the segment's inputs (positions, step-rule state,
            noise), and recompute a segment in backward
            (:func:`ase_bptt.relax.recompute.recompute`). An int: that many
            frames per segment (1 = every frame). Measured at k = 75 with
            the default ADAPT (``benchmarks/bench_bptt.py``): True keeps 14%
            of naive peak memory at 1.3-1.4x naive time. Not
            ``torch.utils.checkpoint``: its per-tensor pack/unpack hooks
            cost more than the recomputation for a model this small
            (2.0-2.3x time, 25% memory). Gradients equal naive BPTT's (the
            same operations run again); they reach the model's and step
            rule's parameters, not other tensors the model captures. Ignored
            under ``torch.no_grad``.
        generator: seeds the exploration noise (only drawn when the rule is in
            training mode with ``noise > 0``).
        sync_active: optional callable taking a 0-d float tensor (1.0 while any
            local structure still moves) and returning the global value (e.g.
            a DDP all-reduce with MAX), so every rank takes the same number of frames.

    Returns:
        :class:`RolloutResult` with the final positions, the frames each
        structure took and whether it converged.

    Host synchronisation: one boolean per frame ("is any structure still
    moving?"), or per segment with ``checkpoint_frames`` (so after the last
    structure stops up to segment - 1 frames run in which nothing moves;
    ``sync_active`` is likewise called once per segment, and every rank
    runs the same segments); on CUDA it is read one frame late (see ``_LaggedFlag``), so the
    GPU queue never drains. Stopping decisions stay on the device.

    Under ``torch.no_grad`` on CPU (without exploration noise or ``sync_active``), structures
    that have stopped are dropped from the working batch, so a batched
    relaxation stops paying model evaluations for them; the results are the
    same as without dropping (each structure's frames are independent of its
    batch mates).
    """
    dtype, device = model_dtype_device(model)
    batch = batch.to(device, dtype)
    positions = batch.positions
    b = len(batch)
    state = step_rule.init_state(batch, positions)
    active = torch.ones(b, dtype=torch.bool, device=device)
    converged = torch.zeros(b, dtype=torch.bool, device=device)
    n_frames = torch.zeros(b, dtype=torch.long, device=device)
    flag_reader = _LaggedFlag(positions.device)
    segment = segment_length(checkpoint_frames, max_steps) if torch.is_grad_enabled() else 0
    compactor = (
        _Compactor(positions, converged, n_frames)
        if sync_active is None and _Compactor.applies(step_rule, device)
        else None
    )
    params = trainable_parameters(model, step_rule) if segment else ()
    start = 0
    while start < max_steps:
        if segment:
            stop = min(max_steps, start + segment)
            noises = [_draw_noise(step_rule, positions, generator) for _ in range(start, stop)]
            noise = None if noises[0] is None else torch.stack(noises)
            keys = tuple(state)
            out_keys: list[str] = []
            run = functools.partial(_segment, model, batch, step_rule, start, stop, tol, fmax, keys, out_keys)
            positions, active, converged, n_frames, *values = recompute(
                run, positions, active, converged, n_frames, noise, *state.values(), params=params
            )
            state = dict(zip(out_keys, values))
        else:
            stop = start + 1
            noise = _draw_noise(step_rule, positions, generator)
            positions, state, active, converged, n_frames = _frame(
                model, batch, step_rule, start, tol, fmax, positions, state, active, converged, n_frames, noise
            )
        start = stop
        if compactor is not None and not bool(active.all()):
            batch, positions, state, active, converged, n_frames = compactor.drop_stopped(
                batch, positions, state, active, converged, n_frames
            )
        flag = active.any()
        if sync_active is not None:
            flag = sync_active(flag.to(dtype)) > 0
        if not flag_reader.any_moving(flag):
            break
    if compactor is not None:
        return compactor.result(positions, converged, n_frames)
    return RolloutResult(positions, n_frames, converged)


def _resolve_model(model: Any) -> tuple[torch.nn.Module, dict | None]:
    """A ForceModel and the relax settings it came with (BPTTCalculator, checkpoint path or model)."""
    if isinstance(model, (str, os.PathLike)):
        from ase_bptt.models.checkpoint import load_checkpoint, load_model

        ckpt = load_checkpoint(model)
        return load_model(ckpt), ckpt.get("relax")
    if hasattr(model, "model") and hasattr(model, "relax_settings") and not isinstance(model, torch.nn.Module):
        return model.model, model.relax_settings
    if isinstance(model, torch.nn.Module):
        return model, getattr(model, "relax_settings", None)
    raise TypeError(
        f"DifferentiableRelaxer needs a torch force model, a BPTTCalculator or a checkpoint path, "
        f"not {type(model).__name__}."
    )


class DifferentiableRelaxer:
    """Relax one or many structures in torch, keeping the graph: ``ase.optimize.Optimizer``'s interface.

    >>> relaxer = DifferentiableRelaxer(atoms, model)      # like FIRE(atoms)
    >>> relaxer.run()                                       # like FIRE(atoms).run(fmax=0.05)
    >>> loss = dq(relaxer.positions, reference, relaxer.batch).sum(); loss.backward()

    Args:
        atoms: one ``Atoms``, a list of them (relaxed together as a batch) or a Batch.
        model: a ForceModel, a ``BPTTCalculator`` or a checkpoint path. The
            float dtype and device are the model's.
        step: ``"fixed"``, ``"learned"``, ``"decoder"``, ``"fire"`` or a StepRule.
            With ``"fixed"`` and ``eta=None`` the step rule saved with the model
            (its checkpoint's ``relax`` settings) is used when there is one,
            else a fixed step of :data:`~ase_bptt.relax.steps.DEFAULT_ETA` (0.05 A^2/eV).
        eta: step size (A^2/eV) for ``"fixed"``, initial value for ``"learned"``/``"decoder"``.
        tol: stop a structure after a frame whose RMS per-atom displacement is below ``tol`` (A);
            None (default) takes the checkpoint's ``tol`` when the step rule comes from it,
            else 1e-3 (the paper's); 0 disables the rule.
        maxstep: largest displacement of any atom in one frame (A), for rules built here.
        logfile: None (default, no log), ``"-"`` for stdout, a path or an open file.
        trajectory: an ASE trajectory path (one structure), a list of paths, or a
            path containing ``{index}`` (one file per structure).
        checkpoint_frames: while gradients are enabled, run each frame's model
            call under no_grad and recompute it in backward (less memory; see
            :func:`rollout`). The relaxer steps one frame at a time, so any
            true value (or int) means per-frame recomputation here.

    Every frame is recorded for autograd while gradients are enabled; to relax
    without training, wrap the run in ``torch.no_grad()`` (less memory, faster).

    Attributes:
        batch: the structures; ``positions``: the current ``(B, N, 3)`` positions
        (differentiable); ``nsteps``: frames taken; ``n_frames``: frames per
        structure ``(B,)``; ``structure_converged``: ``(B,)`` bool.
    """

    def __init__(
        self,
        atoms: Atoms | Sequence[Atoms] | Batch,
        model: Any,
        *,
        step: str | StepRule = "fixed",
        eta: float | None = None,
        tol: float | None = None,
        maxstep: float | None = 0.2,
        logfile: Any = None,
        trajectory: Any = None,
        checkpoint_frames: bool | int = False,
    ) -> None:
        self.model, settings = _resolve_model(model)
        dtype, device = model_dtype_device(self.model)
        if isinstance(atoms, Batch):
            self.batch = atoms.to(device, dtype)
            self._input_atoms = None
        else:
            self._input_atoms = [atoms] if isinstance(atoms, Atoms) else list(atoms)
            self.batch = Batch.from_atoms(self._input_atoms, device=device, dtype=dtype)
        saved_tol = saved_steps = None
        check = getattr(self.model, "check_species", None)
        if check is not None:  # once here, not every frame (that would synchronise a GPU)
            check(self.batch.numbers, where="the structures given to DifferentiableRelaxer")
        if isinstance(step, StepRule):
            rule = step
        elif step == "fixed" and eta is None and settings:
            rule, saved_tol, saved_steps = rule_from_relax_settings(settings)
            rule = rule.to(device=device, dtype=dtype)
        else:
            rule = make_step_rule(step, eta=eta, maxstep=maxstep).to(device=device, dtype=dtype)
        self.step_rule = rule
        self.tol = float(tol if tol is not None else (saved_tol if saved_tol is not None else DEFAULT_TOL))
        #: default ``steps`` of :meth:`run`: the checkpoint's ``max_steps``, else 75.
        self.max_frames = int(saved_steps or DEFAULT_MAX_STEPS)
        self.checkpoint_frames = checkpoint_frames
        self.fmax: float | None = None
        self.nsteps = 0
        self.max_steps = 0
        self.observers: list[tuple[Callable, int, tuple, dict]] = []

        b = len(self.batch)
        self.positions = self.batch.positions
        self.state = rule.init_state(self.batch, self.positions)
        self.active = torch.ones(b, dtype=torch.bool, device=device)
        self.structure_converged = torch.zeros(b, dtype=torch.bool, device=device)
        self.n_frames = torch.zeros(b, dtype=torch.long, device=device)
        self._forces: torch.Tensor | None = None
        self._energy: torch.Tensor | None = None

        self._logfile = logfile
        self._own_log = None
        if isinstance(logfile, (str, os.PathLike)) and logfile != "-":
            self._own_log = open(logfile, "a")
        self._trajectories = self._open_trajectories(trajectory)

    # ------------------------------------------------------------ context
    def __enter__(self) -> DifferentiableRelaxer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the log and trajectory files this relaxer opened."""
        if self._own_log is not None:
            self._own_log.close()
            self._own_log = None
        for traj in self._trajectories:
            traj.close()
        self._trajectories = []

    def _open_trajectories(self, trajectory: Any) -> list:
        if trajectory is None:
            return []
        from ase.io.trajectory import Trajectory

        b = len(self.batch)
        if isinstance(trajectory, (list, tuple)):
            paths = list(trajectory)
        elif "{index}" in os.fspath(trajectory):
            paths = [os.fspath(trajectory).format(index=i) for i in range(b)]
        else:
            paths = [trajectory]
        if len(paths) != b:
            raise ValueError(
                f"trajectory names {len(paths)} file(s) for {b} structures; give a list of {b} paths "
                "or a name containing '{index}', e.g. 'relax-{index}.traj'."
            )
        return [Trajectory(p, "w") for p in paths]

    # ---------------------------------------------------------- evaluation
    def _evaluate(self) -> torch.Tensor:
        """Forces at the current positions (cached, like an ASE calculator)."""
        if self._forces is None:
            if self.checkpoint_frames and torch.is_grad_enabled():
                params = trainable_parameters(self.model)
                out = recompute(lambda p: tuple(self.model(self.batch, positions=p))[:2], self.positions, params=params)
            else:
                out = self.model(self.batch, positions=self.positions)
            self._forces, self._energy = out[0], out[1]
        return self._forces

    def _check_fmax(self) -> None:
        if self.fmax is None:
            return
        small = max_force(self._evaluate().detach(), self.batch) < self.fmax
        self.structure_converged = self.structure_converged | (self.active & small)
        self.active = self.active & ~small

    # --------------------------------------------------------------- steps
    def step(self) -> None:
        """Take one frame for every structure still moving (advances ``nsteps``)."""
        forces = self._evaluate()
        noise = _draw_noise(self.step_rule, self.positions, None)
        fn = functools.partial(_frame, self.model, self.batch, self.step_rule, self.nsteps, self.tol, None)
        args = (self.positions, self.state, self.active, self.structure_converged, self.n_frames, noise)
        # Only the model call is recomputed (in _evaluate); the step rule's own
        # activations are per-atom vectors, small next to the model's.
        out = fn(*args, forces=forces)
        self._moved = self.active.clone()
        self.positions, self.state, self.active, self.structure_converged, self.n_frames = out
        self._forces = self._energy = None
        self.nsteps += 1

    def irun(self, fmax: float | None = None, steps: int | None = None) -> Iterator[bool]:
        """Relax as a generator, yielding :meth:`converged` after each frame (as ASE's ``irun``)."""
        self.fmax = fmax
        self.max_steps = self.nsteps + (self.max_frames if steps is None else steps)
        self._evaluate()
        if self.nsteps == 0:
            self._moved = torch.ones_like(self.active)
            self._report_frame()
        self._check_fmax()
        yield self.converged()
        while bool(self.active.any()) and self.nsteps < self.max_steps:
            self.step()
            self._evaluate()
            self._report_frame()
            self._check_fmax()
            yield self.converged()

    def _report_frame(self) -> None:
        """What ASE does after each frame: log line, trajectory frame, observers."""
        self.log()
        self._write_trajectory()
        self.call_observers()

    def run(self, fmax: float | None = None, steps: int | None = None) -> bool:
        """Relax until every structure has stopped or ``steps`` frames; True if all converged.

        Args:
            fmax: optional force criterion (eV/A) next to the ``tol`` displacement rule.
            steps: most frames to take in this call (default: the checkpoint's
                ``max_steps`` when the rule came from it, else 75).
        """
        is_converged = False
        for is_converged in self.irun(fmax=fmax, steps=steps):  # noqa: B007 (the last value is the result)
            pass
        return is_converged

    def converged(self) -> bool:
        """True when every structure has stopped by ``tol`` or ``fmax``."""
        return bool(self.structure_converged.all())

    # ----------------------------------------------------------- observers
    def attach(self, function: Callable, interval: int = 1, *args: Any, **kwargs: Any) -> None:
        """Call ``function(*args, **kwargs)`` every ``interval`` frames (``interval <= 0``: only at that frame)."""
        if not callable(function):
            function = function.write
        self.observers.append((function, interval, args, kwargs))

    def call_observers(self) -> None:
        for function, interval, args, kwargs in self.observers:
            if (interval > 0 and self.nsteps % interval == 0) or (interval <= 0 and self.nsteps == abs(interval)):
                function(*args, **kwargs)

    # ------------------------------------------------------------- outputs
    def get_atoms(self) -> list[Atoms]:
        """The structures at the current positions, with energy and forces when known."""
        images = self.batch.to_atoms(self.positions)
        if self._forces is not None:
            forces = self._forces.detach().double().cpu().numpy()
            energy = None if self._energy is None else self._energy.detach().double().cpu().numpy()
            mask = self.batch.mask.cpu().numpy()
            for i, atoms in enumerate(images):
                atoms.calc = SinglePointCalculator(
                    atoms, forces=forces[i, mask[i]], energy=None if energy is None else float(energy[i])
                )
        if self._input_atoms is not None:
            for atoms, original in zip(images, self._input_atoms):
                atoms.info.update(original.info)
        return images

    def todict(self) -> dict[str, Any]:
        """A JSON-like description, as ASE optimizers give (written into trajectories)."""
        rule = {k: v for k, v in self.step_rule.to_dict().items() if k != "state_dict"}
        return {
            "type": "optimization",
            "optimizer": type(self).__name__,
            "step_rule": rule,
            "tol": self.tol,
            "maxstep": self.step_rule.maxstep,
            "max_steps": self.max_steps,
            "fmax": self.fmax,
        }

    def log(self) -> None:
        """One ASE-style line per structure that moved in the last frame."""
        if self._logfile is None:
            return
        name = type(self).__name__
        b = len(self.batch)
        names = [name] if b == 1 else [f"{name}[{i}]" for i in range(b)]
        width = max(len(n) for n in names)
        lines = []
        if self.nsteps == 0:
            lines.append("%s  %4s %8s %15s  %12s\n" % (" " * width, "Step", "Time", "Energy", "fmax"))
        fmax = max_force(self._forces.detach(), self.batch).double().cpu().tolist()
        energy = [float("nan")] * b if self._energy is None else self._energy.detach().double().cpu().tolist()
        t = time.localtime()
        for i in torch.nonzero(self._moved).flatten().tolist():
            lines.append(
                "%s:  %3d %02d:%02d:%02d %15.6f %15.6f\n"
                % (names[i].ljust(width), self.nsteps, t[3], t[4], t[5], energy[i], fmax[i])
            )
        text = "".join(lines)
        if self._own_log is not None:
            self._own_log.write(text)
            self._own_log.flush()
        elif self._logfile == "-":
            print(text, end="")
        else:
            self._logfile.write(text)

    def _write_trajectory(self) -> None:
        if not self._trajectories:
            return
        images = self.get_atoms()
        for i in torch.nonzero(self._moved).flatten().tolist():
            self._trajectories[i].write(images[i])

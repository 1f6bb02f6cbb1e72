"""DifferentiableRelaxer: batched relaxations in torch that gradients flow through.

It wraps :func:`~ase_bptt.relax.rollout.relax_frame` (the frame
:func:`~ase_bptt.relax.rollout.rollout` repeats) in the interface of
``ase.optimize.Optimizer`` (``run``, ``irun``, ``step``, ``attach``, log and
trajectory files), so an ASE user knows it at sight. ``rollout`` and
``RolloutResult`` are re-exported here (their old home).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.batch import Batch
from ase_bptt.metrics import max_force
from ase_bptt.relax.base import StepRule
from ase_bptt.relax.defaults import DEFAULT_FMAX, DEFAULT_MAX_STEPS, DEFAULT_TOL
from ase_bptt.relax.recompute import recompute, trainable_parameters
from ase_bptt.relax.registry import make_step_rule, rule_from_relax_settings
from ase_bptt.relax.rollout import Carry, RolloutResult, _draw_noise, model_dtype_device, relax_frame, rollout

__all__ = ["RolloutResult", "rollout", "DifferentiableRelaxer", "DEFAULT_TOL", "DEFAULT_MAX_STEPS"]


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
            else 1e-3 (the paper's); 0 disables the rule. A FIRE step ignores the
            checkpoint's and the default ``tol``: it uses one only when given here.
        maxstep: largest displacement of any atom in one frame (A), for rules built here.
        logfile: None (default, no log), ``"-"`` for stdout, a path or an open file.
        trajectory: an ASE trajectory path (one structure), a list of paths, or a
            path containing ``{index}`` (one file per structure).
        checkpoint_frames: while gradients are enabled, run each frame's model
            call under no_grad and recompute it in backward (less memory; see
            :func:`rollout`). The relaxer steps one frame at a time, so any
            true value (or int) means per-frame recomputation here.

    What stops a structure, by rule: ``"fixed"``, ``"learned"`` and
    ``"decoder"`` steps stop after a frame that moves atoms by less than
    ``tol`` (RMS), or once the largest force is below ``fmax`` when ``run`` is
    given one (whichever comes first), or after ``steps`` frames. ``"fire"``
    stops as ``ase.optimize.FIRE`` does: by ``fmax`` (``run()``'s default is
    ASE's 0.05 eV/A) or ``steps``, and by ``tol`` only when ``tol`` is passed
    explicitly (FIRE's first steps are tiny, its velocity starting at zero).

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
        #: displacement tolerance (A), or None where only ``fmax`` and ``steps`` stop the run (FIRE).
        self.tol = rule.stopping_tol(tol, saved_tol)
        #: default ``steps`` of :meth:`run`: the checkpoint's ``max_steps``, else 75.
        self.max_frames = int(saved_steps or DEFAULT_MAX_STEPS)
        self.checkpoint_frames = checkpoint_frames
        self.fmax: float | None = None
        self.nsteps = 0
        self.max_steps = 0
        self.observers: list[tuple[Callable, int, tuple, dict]] = []

        #: positions, step-rule state and per-structure flags, as the frames of :func:`rollout` carry them.
        self.carry = Carry.start(rule, self.batch, self.batch.positions)
        self._forces: torch.Tensor | None = None
        self._energy: torch.Tensor | None = None

        self._logfile = logfile
        self._own_log = None
        if isinstance(logfile, (str, os.PathLike)) and logfile != "-":
            self._own_log = open(logfile, "a")
        self._trajectories = self._open_trajectories(trajectory)

    # ------------------------------------------------------------ carried
    @property
    def positions(self) -> torch.Tensor:
        """The current ``(B, N, 3)`` positions (differentiable)."""
        return self.carry.positions

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The step rule's state after the last frame."""
        return self.carry.state

    @property
    def active(self) -> torch.Tensor:
        """``(B,)`` bool: structures still moving."""
        return self.carry.active

    @property
    def structure_converged(self) -> torch.Tensor:
        """``(B,)`` bool: structures stopped by ``tol`` or ``fmax``."""
        return self.carry.converged

    @property
    def n_frames(self) -> torch.Tensor:
        """``(B,)`` long: frames each structure took."""
        return self.carry.n_frames

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
        self.carry = self.carry.stop_where(max_force(self._evaluate().detach(), self.batch) < self.fmax)

    # --------------------------------------------------------------- steps
    def step(self) -> None:
        """Take one frame for every structure still moving (advances ``nsteps``)."""
        forces = self._evaluate()
        noise = _draw_noise(self.step_rule, self.positions, None)
        self._moved = self.active.clone()
        # Only the model call is recomputed (in _evaluate); the step rule's own
        # activations are per-atom vectors, small next to the model's.
        self.carry = relax_frame(
            self.model, self.batch, self.step_rule, self.nsteps, self.carry, tol=self.tol, noise=noise, forces=forces
        )
        self._forces = self._energy = None
        self.nsteps += 1

    def irun(self, fmax: float | None = None, steps: int | None = None) -> Iterator[bool]:
        """Relax as a generator, yielding :meth:`converged` after each frame (as ASE's ``irun``)."""
        self.fmax = DEFAULT_FMAX if fmax is None and self.tol is None else fmax
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
            fmax: force criterion (eV/A) next to the ``tol`` displacement rule; None:
                none, or ASE's 0.05 where no ``tol`` applies (FIRE).
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
        fmax = max_force(self._evaluate().detach(), self.batch).double().cpu().tolist()
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

"""Relaxation throughput over batch sizes: structures/s and us per atom-step, ase-bptt against TorchSim and ASE.

Rattled 64-site silicon point-defect cells (63-65 atoms), one untrained ADAPT
of the default size, ``torch.no_grad()``. Batch sizes 1, 4, 16, 64, 256, ...
up to ``--max-batch``, growing until the automatic batch size
(``ase_bptt.relax.batching``) says the next size does not fit in memory or a
batched run (ase-bptt or TorchSim) of the previous size took longer than ``--time-limit`` s.
Rows per batch size (each timing covers Atoms in to positions out; the rows of
one size are timed round-robin, median of ``--repeats``):

* ``fixed``: ase-bptt's batched ``rollout`` with ``FixedStep(0.05)`` and
  ``tol=None``: every structure takes exactly ``--max-steps`` frames (the
  workload of the GPU issue's table);
* ``fire``: ase-bptt's batched ``rollout`` with ``FIREStep`` (ASE's FIRE),
  stopping at ``fmax`` or ``--max-steps``;
* ``torchsim_fire``: the same model wrapped as a TorchSim model, relaxed with
  ``ts.optimize`` and TorchSim's ASE-flavoured FIRE, same stopping rule and
  device (optional: skipped with a note when ``torch_sim`` is not installed;
  ``pip install ase-bptt[torchsim]``). The positions it reaches are compared
  with ``fire``'s (max |dx|; see ``_torchsim.py`` for why they differ);
* ``ase_fire`` and ``learned_step_optimizer``: one structure at a time through
  ``BPTTCalculator`` (as in ``bench_relax.py``), only up to ``--baseline-max``
  structures, since they scale linearly and would dominate the run.

``us_per_atom_step`` = time / (sum over structures of atoms x updates) and
``ms_per_structure_frame`` = time / (sum of updates); TorchSim evaluates the
model once more per structure (forces at the final positions), counted in its
time but not as an update.

    python benchmarks/bench_throughput.py --threads 1
    python benchmarks/bench_throughput.py --device cuda --max-batch 4096
    python benchmarks/bench_throughput.py --device cuda --sizes 1 32 256 1024 4096
    python benchmarks/bench_throughput.py --quick
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import _torchsim as TS  # noqa: E402
import torch  # noqa: E402
from bench_relax import ETA, _relax_ase_fire, _relax_learned_step  # noqa: E402

FMAX = 0.05  # eV/A, ASE's usual criterion


def _positions(batch, positions) -> list:
    mask = batch.mask.cpu()
    pos = positions.detach().double().cpu()
    return [pos[i, mask[i]].numpy() for i in range(len(batch))]


def _rollout(rule_name: str):
    def run(model, cells, max_steps: int, device: str, dtype: torch.dtype) -> tuple[list, list[int]]:
        from ase_bptt.batch import Batch
        from ase_bptt.relax.fire import FIREStep
        from ase_bptt.relax.relaxer import rollout
        from ase_bptt.relax.steps import FixedStep

        with torch.no_grad():
            batch = Batch.from_atoms(cells).to(device=device, dtype=dtype)
            if rule_name == "fixed":
                out = rollout(model, batch, FixedStep(ETA), tol=None, max_steps=max_steps)
            else:
                out = rollout(model, batch, FIREStep(), tol=None, fmax=FMAX, max_steps=max_steps)
            return _positions(batch, out.positions), out.n_frames.tolist()

    return run


def _torchsim_fire(model, cells, max_steps: int, device: str, dtype: torch.dtype) -> tuple[list, list[int]]:
    positions, _ = TS.relax_torchsim(model, cells, fmax=FMAX, max_steps=max_steps)
    return positions, [-1] * len(cells)


def _one_at_a_time(fn):
    def run(model, cells, max_steps: int, device: str, dtype: torch.dtype) -> tuple[list, list[int]]:
        out, frames = fn(model, cells, max_steps)
        return [a.positions for a in out], frames

    return run


MODES = {
    "fixed": _rollout("fixed"),
    "fire": _rollout("fire"),
    "torchsim_fire": _torchsim_fire,
    "ase_fire": _one_at_a_time(_relax_ase_fire),
    "learned_step_optimizer": _one_at_a_time(_relax_learned_step),
}
BASELINES = ("ase_fire", "learned_step_optimizer")


class _CountEvaluations(torch.nn.Module):
    """Counts structure-evaluations of the wrapped model (TorchSim does not report frames per structure)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.count = 0

    def forward(self, batch, positions=None):
        self.count += len(batch)
        return self.model(batch, positions=positions)


def _time_modes(modes: list[str], model, cells, args, dtype) -> dict[str, dict]:
    """Time every mode on ``cells``, round-robin over repeats (a busy spell of a shared machine hits all alike)."""
    counter = _CountEvaluations(model)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    outputs: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for mode in modes:
            counter.count = 0
            C.synchronize(args.device)
            t0 = time.perf_counter()
            positions, frames = MODES[mode](counter, cells, args.max_steps, args.device, dtype)
            C.synchronize(args.device)
            samples[mode].append(time.perf_counter() - t0)
            outputs[mode] = (positions, frames, counter.count)
        if max(s[-1] for s in samples.values()) > args.time_limit:
            break  # one round is enough for a size this slow
    mean_atoms = sum(len(a) for a in cells) / len(cells)
    out = {}
    for mode in modes:
        positions, frames, evaluations = outputs[mode]
        known = min(frames) >= 0  # TorchSim does not report frames: its evaluations less one initial per structure
        updates = sum(frames) if known else evaluations - len(cells)
        atom_steps = sum(len(a) * f for a, f in zip(cells, frames)) if known else updates * mean_atoms
        t = C.summarize(samples[mode])
        out[mode] = {
            "time": t,
            "structures_per_s": len(cells) / t["median_s"],
            "updates": updates,
            "model_evaluations": evaluations,
            "ms_per_structure_frame": t["median_s"] / max(updates, 1) * 1e3,
            "us_per_atom_step": t["median_s"] / max(atom_steps, 1) * 1e6,
            "_positions": positions,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    from ase_bptt.relax.batching import auto_batch_size

    parser = C.make_parser("bench_throughput", __doc__.splitlines()[0])
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch size (default 4096; quick 4)")
    parser.add_argument("--max-steps", type=int, default=None, help="most frames per relaxation (default 75; quick 5)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="stop growing after a run this long (s)")
    parser.add_argument("--baseline-max", type=int, default=16, help="time one-at-a-time ASE rows up to this size")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="explicit batch sizes (run smallest first) instead of 1, 4, 16, ...; memory and --time-limit still stop it",
    )
    args = C.finish_args(parser.parse_args(argv))
    args.max_batch = args.max_batch or (4 if args.quick else 4096)
    args.max_steps = args.max_steps or (5 if args.quick else 75)
    dtype = C.torch_dtype(args.dtype)
    model = C.build_model(quick=args.quick, device=args.device, dtype=dtype)
    repeat = 1 if args.quick else 2
    torchsim = TS.available()
    note = None if torchsim else "torch_sim not installed (pip install ase-bptt[torchsim]): TorchSim rows skipped"
    if note:
        print(note)
    widest = len(C.silicon_defect_cells(2, repeat=repeat)[1])
    memory_cap = auto_batch_size(widest, model, grad=False, device=args.device)
    warm = C.silicon_defect_cells(2, repeat=repeat, rattle=0.1, seed=1)
    for mode, fn in MODES.items():  # lazy kernel set-up is not throughput
        if mode != "torchsim_fire" or torchsim:
            fn(model, warm, 2, args.device, dtype)

    if args.sizes:
        if min(args.sizes) < 1:
            raise SystemExit("--sizes must be positive")
        sizes = sorted(set(args.sizes))
        args.max_batch = max(sizes)
    else:  # 1, 4, 16, ... up to --max-batch
        sizes = list(itertools.takewhile(lambda b: b <= args.max_batch, (4**i for i in itertools.count())))
    rows, stop_reason = [], "max_batch"
    for size in sizes:
        if size > memory_cap:
            stop_reason = f"memory: the automatic batch size allows {memory_cap}"
            break
        cells = C.silicon_defect_cells(size, repeat=repeat, rattle=0.1, seed=0)
        modes = [
            m for m in MODES if (m != "torchsim_fire" or torchsim) and (m not in BASELINES or size <= args.baseline_max)
        ]
        for mode, r in _time_modes(modes, model, cells, args, dtype).items():
            rows.append({"batch": size, "mode": mode, **r})
            # One line per row as it is measured, so a run cut off by a time limit still leaves its figures.
            print(
                f"  B={size} {mode}: {r['structures_per_s']:.1f} structures/s, "
                f"{r['ms_per_structure_frame']:.4f} ms/structure-frame, median of {len(r['time']['samples_s'])}",
                flush=True,
            )
        fire = {r["mode"]: r for r in rows if r["batch"] == size}
        if "torchsim_fire" in fire:
            fire["torchsim_fire"]["max_position_difference_vs_fire_A"] = TS.max_position_difference(
                fire["torchsim_fire"]["_positions"], fire["fire"]["_positions"]
            )
        # The one-at-a-time rows stop at --baseline-max anyway; only the batched ones decide growth.
        if (
            max(r["time"]["median_s"] for r in rows if r["batch"] == size and r["mode"] not in BASELINES)
            > args.time_limit
        ):
            stop_reason = f"time: a run at batch {size} took over {args.time_limit:g} s"
            break
    for r in rows:
        r.pop("_positions")
        r["speedup_vs_torchsim_fire"] = None
    for r in rows:
        ts_row = next((x for x in rows if x["batch"] == r["batch"] and x["mode"] == "torchsim_fire"), None)
        if r["mode"] == "fire" and ts_row is not None:
            r["speedup_vs_torchsim_fire"] = ts_row["ms_per_structure_frame"] / r["ms_per_structure_frame"]

    table = C.print_table(
        rows,
        [
            ("batch", "B", "{}"),
            ("mode", "mode", "{}"),
            ("structures_per_s", "structures/s", "{:.1f}"),
            ("ms_per_structure_frame", "ms/structure-frame", "{:.3f}"),
            ("us_per_atom_step", "us/atom-step", "{:.2f}"),
            ("speedup_vs_torchsim_fire", "fire vs TorchSim", "{:.2f}x"),
            ("max_position_difference_vs_fire_A", "|dx| vs fire A", "{:.1e}"),
        ],
    )
    line = f"stopped growing: {stop_reason}" + (f"; {note}" if note else "")
    print(line)
    payload = {
        "benchmark": "bench_throughput",
        "environment": C.environment(args),
        "model_parameters": C.n_parameters(model),
        "atoms_per_structure": sorted({len(a) for a in C.silicon_defect_cells(4, repeat=repeat)}),
        "settings": {
            "eta": ETA,
            "fmax": FMAX,
            "max_steps": args.max_steps,
            "time_limit_s": args.time_limit,
            "baseline_max": args.baseline_max,
            "sizes": sizes if args.sizes else None,
            "memory_cap": memory_cap,
        },
        "torchsim_available": torchsim,
        "notes": [note] if note else [],
        "stop_reason": stop_reason,
        "results": rows,
        "table": table + "\n" + line,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

"""Relaxation throughput: one structure at a time through ASE vs a whole batch in torch.

32 rattled 64-site silicon point-defect cells (vacancy, tetrahedral
interstitial, C and Ge substitutions; 63-65 atoms), one untrained ADAPT of the
default (demo) size, relaxed three ways:

(a) ``ase_fire``: ASE's ``FIRE`` + ``BPTTCalculator``, one structure at a time
    (ASE's own stopping: ``fmax=0.05`` or ``max_steps``);
(b) ``learned_step_optimizer``: ``LearnedStepOptimizer`` (fixed step ``eta``)
    + ``BPTTCalculator``, one structure at a time;
(c) ``batched_rollout``: ``DifferentiableRelaxer`` on all 32 at once under
    ``torch.no_grad()``, same step rule and stopping as (b) (RMS displacement
    of a frame < ``tol``, or ``max_steps``).

Each timing covers the whole job, Atoms in to relaxed Atoms out. Reported:
structures/s per mode and the ratio (c)/(b) (goal >= 10 on CPU). (c)'s final
positions are checked against (b)'s in float64 (goal: equal to 1e-5 A), and
every structure must take the same number of frames in both.

    python benchmarks/bench_relax.py --threads 1
    python benchmarks/bench_relax.py --quick
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_SPEEDUP = 10.0
POSITION_TOLERANCE_A = 1e-5
ETA = 0.05  # A^2/eV, the package's default fixed step
TOL = 1e-3  # A, the paper's stopping rule
MAXSTEP = 0.2  # A


def _relax_ase_fire(model, cells, max_steps: int) -> tuple[list, list[int]]:
    from ase.optimize import FIRE

    from ase_bptt.calculator import BPTTCalculator

    calc = BPTTCalculator(model)
    out, frames = [], []
    for atoms in cells:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=0.05, steps=max_steps)
        out.append(atoms)
        frames.append(opt.nsteps)
    return out, frames


def _relax_learned_step(model, cells, max_steps: int) -> tuple[list, list[int]]:
    from ase_bptt.calculator import BPTTCalculator
    from ase_bptt.relax.optimizer import LearnedStepOptimizer

    calc = BPTTCalculator(model)
    out, frames = [], []
    for atoms in cells:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = LearnedStepOptimizer(atoms, eta=ETA, tol=TOL, maxstep=MAXSTEP, logfile=None)
        opt.run(steps=max_steps)
        out.append(atoms)
        frames.append(opt.nsteps)
    return out, frames


def _relax_batched(model, cells, max_steps: int) -> tuple[list, list[int]]:
    from ase_bptt.relax.relaxer import DifferentiableRelaxer

    with torch.no_grad():
        relaxer = DifferentiableRelaxer(cells, model, step="fixed", eta=ETA, tol=TOL, maxstep=MAXSTEP)
        relaxer.run(steps=max_steps)
        out = relaxer.get_atoms()
    return out, relaxer.n_frames.tolist()


MODES = {
    "ase_fire": _relax_ase_fire,
    "learned_step_optimizer": _relax_learned_step,
    "batched_rollout": _relax_batched,
}


def _max_position_difference(a: list, b: list) -> float:
    return max(float(np.abs(x.positions - y.positions).max()) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    parser = C.make_parser("bench_relax", __doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=None, help="number of cells (default 32; quick 4)")
    parser.add_argument("--max-steps", type=int, default=None, help="most frames per relaxation (default 75; quick 5)")
    args = C.finish_args(parser.parse_args(argv))
    n = args.structures or (4 if args.quick else 32)
    max_steps = args.max_steps or (5 if args.quick else 75)
    cells = C.silicon_defect_cells(n, repeat=1 if args.quick else 2, rattle=0.1, seed=0)
    dtype = C.torch_dtype(args.dtype)
    model = C.build_model(quick=args.quick, device=args.device, dtype=dtype)

    # Warm up every path on two structures and a few frames (lazy kernel set-up is not throughput).
    for fn in MODES.values():
        fn(model, cells[:2], min(3, max_steps))
    # The model alone, one structure vs the whole batch (no_grad), timed in the same repeats as the
    # modes, to show where the time goes.
    from ase_bptt.batch import Batch

    one = Batch.from_atoms(cells[0]).to(device=args.device, dtype=dtype)
    whole = Batch.from_atoms(cells).to(device=args.device, dtype=dtype)
    inner = 2 if args.quick else 10

    def forward(batch):
        def run() -> None:
            with torch.no_grad():
                for _ in range(inner):
                    model(batch)

        return run

    jobs = {mode: functools.partial(fn, model, cells, max_steps) for mode, fn in MODES.items()}
    jobs["forward_one"] = forward(one)
    jobs["forward_batch"] = forward(whole)
    jobs["forward_one"]()
    jobs["forward_batch"]()
    times: dict[str, list[float]] = {m: [] for m in jobs}
    frames: dict[str, list[int]] = {}
    results: dict[str, list] = {}
    for _ in range(args.repeats):
        for mode, job in jobs.items():  # interleaved, so a busy spell on a shared machine hits all modes
            C.synchronize(args.device)
            t0 = time.perf_counter()
            out = job()
            C.synchronize(args.device)
            times[mode].append(time.perf_counter() - t0)
            if mode in MODES:
                results[mode], frames[mode] = out

    modes = {}
    for mode in MODES:
        t = C.summarize(times[mode])
        modes[mode] = {
            "time": t,
            "structures_per_s": n / t["median_s"],
            "frames_per_structure": {
                "mean": float(np.mean(frames[mode])),
                "min": int(min(frames[mode])),
                "max": int(max(frames[mode])),
            },
            "model_evaluations_per_s": (sum(frames[mode]) + n) / t["median_s"],
        }
    speedup = modes["batched_rollout"]["structures_per_s"] / modes["learned_step_optimizer"]["structures_per_s"]

    fwd_one = C.summarize([t / inner for t in times["forward_one"]])["median_s"]
    fwd_batch = C.summarize([t / inner for t in times["forward_batch"]])["median_s"]
    b = modes["learned_step_optimizer"]
    per_frame_b = b["time"]["median_s"] / (sum(frames["learned_step_optimizer"]) + n)
    per_frame_c = modes["batched_rollout"]["time"]["median_s"] / (max(frames["batched_rollout"]) + 1) / n
    components = {
        "forward_one_structure_s": fwd_one,
        "forward_whole_batch_per_structure_s": fwd_batch / n,
        "b_time_per_model_evaluation_s": per_frame_b,
        "c_time_per_structure_frame_s": per_frame_c,
        "b_share_outside_model": 1.0 - fwd_one / per_frame_b,
        "c_share_outside_model": 1.0 - (fwd_batch / n) / per_frame_c,
        "ceiling_speedup_if_c_were_only_its_batched_forward": per_frame_b / (fwd_batch / n),
    }

    # Same answer: (c) against (b) in float64 (untimed), and in the timed dtype for information.
    model64 = C.build_model(quick=args.quick, device=args.device, dtype=torch.float64)
    ref64, frames_ref = _relax_learned_step(model64, cells, max_steps)
    bat64, frames_bat = _relax_batched(model64, cells, max_steps)
    equality = {
        "dtype": "float64",
        "max_abs_position_difference_A": _max_position_difference(ref64, bat64),
        "tolerance_A": POSITION_TOLERANCE_A,
        "frames_equal": [int(x) for x in frames_ref] == [int(x) for x in frames_bat],
        "timed_dtype": args.dtype,
        "timed_dtype_max_abs_position_difference_A": _max_position_difference(
            results["learned_step_optimizer"], results["batched_rollout"]
        ),
    }
    equality["met"] = equality["max_abs_position_difference_A"] <= POSITION_TOLERANCE_A and equality["frames_equal"]

    table = C.print_table(
        [
            {
                "mode": m,
                "t": v["time"]["median_s"],
                "sps": v["structures_per_s"],
                "eps": v["model_evaluations_per_s"],
                "frames": v["frames_per_structure"]["mean"],
                "x": v["structures_per_s"] / modes["learned_step_optimizer"]["structures_per_s"],
            }
            for m, v in modes.items()
        ],
        [
            ("mode", "mode", "{}"),
            ("t", "time s", "{:.2f}"),
            ("sps", "structures/s", "{:.2f}"),
            ("frames", "frames/structure", "{:.1f}"),
            ("eps", "model evals/s", "{:.0f}"),
            ("x", "vs (b)", "{:.2f}"),
        ],
    )
    line = (
        f"(c)/(b) = {speedup:.2f}x (goal >= {GOAL_SPEEDUP:g}: {'met' if speedup >= GOAL_SPEEDUP else 'MISSED'}); "
        f"float64 positions (c) vs (b): max |dx| = {equality['max_abs_position_difference_A']:.2e} A "
        f"(<= {POSITION_TOLERANCE_A:g}: {'met' if equality['met'] else 'MISSED'}), frames equal: {equality['frames_equal']}"
    )
    line += (
        f"\nper model evaluation: (b) {per_frame_b * 1e3:.2f} ms ({components['b_share_outside_model']:.0%} outside the "
        f"model; forward alone {fwd_one * 1e3:.2f} ms); (c) {per_frame_c * 1e3:.2f} ms per structure "
        f"(batched forward {fwd_batch / n * 1e3:.2f} ms per structure): ceiling for (c)/(b) with a "
        f"zero-overhead batched loop {components['ceiling_speedup_if_c_were_only_its_batched_forward']:.1f}x"
    )
    print(line)
    payload = {
        "benchmark": "bench_relax",
        "environment": C.environment(args),
        "model_parameters": C.n_parameters(model),
        "n_structures": n,
        "atoms_per_structure": sorted({len(a) for a in cells}),
        "settings": {"eta": ETA, "tol": TOL, "maxstep": MAXSTEP, "max_steps": max_steps, "fire_fmax": 0.05},
        "modes": modes,
        "speedup_batched_over_one_at_a_time": speedup,
        "goal": {"speedup_min": GOAL_SPEEDUP, "position_tolerance_A": POSITION_TOLERANCE_A},
        "goal_met": speedup >= GOAL_SPEEDUP,
        "equality_check": equality,
        "components": components,
        "table": table + "\n" + line,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

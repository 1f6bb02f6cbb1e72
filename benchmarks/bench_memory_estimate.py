"""Memory estimate of the automatic batch size against measured peaks: is it an upper bound, and how loose?

For batches of rattled silicon cells (every other one with a vacancy, so the
batch is padded and attention runs masked, as for mixed defect sets), each
configuration in a fresh subprocess (``--quick``: its three one after the
other in the script's own process, the high-water mark reset before each; CPU:
resident-set high-water mark; CUDA: max_memory_allocated; see
``_common.py``), this measures the peak of

* an inference rollout (``torch.no_grad``, ``FixedStep``, ``tol=0`` so every
  structure takes every frame);
* a BPTT rollout (forward + backward of the summed final positions), naive
  and with ``checkpoint_frames=True``,

and divides it by ``ase_bptt.relax.batching.estimate_structure_bytes`` times
the batch size. Goal: every ratio <= 1 (the estimate is an upper bound) and
>= 1 / ESTIMATE_FACTOR (it is not uselessly loose).

``--model adapt-mi`` measures ADAPT-MI instead (its per-pair tensors dominate;
the smallest cell here, 10.9 A high, fits its 5 A cutoff).

    python benchmarks/bench_memory_estimate.py --threads 1
    python benchmarks/bench_memory_estimate.py --threads 1 --model adapt-mi --out benchmarks/results/bench_memory_estimate-adapt-mi.json
    python benchmarks/bench_memory_estimate.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

ETA = 0.01  # A^2/eV: keeps an untrained model's rollout near the crystal


def _configs(quick: bool) -> list[dict]:
    if quick:  # big enough (tens of MiB) to stand above the resident-set noise
        return [
            {"grad": False, "checkpoint": False, "n_sites": 64, "batch": 32, "frames": 3},
            {"grad": True, "checkpoint": False, "n_sites": 64, "batch": 4, "frames": 6},
            {"grad": True, "checkpoint": True, "n_sites": 64, "batch": 4, "frames": 9},
        ]
    out = []
    for n_sites, batch in ((64, 64), (216, 16), (512, 4)):
        out.append({"grad": False, "checkpoint": False, "n_sites": n_sites, "batch": batch, "frames": 5})
    for n_sites, batch in ((64, 16), (216, 4)):
        for checkpoint in (False, True):
            out.append({"grad": True, "checkpoint": checkpoint, "n_sites": n_sites, "batch": batch, "frames": 25})
    return out


def _measure(spec: dict) -> dict:
    from ase_bptt.batch import Batch
    from ase_bptt.relax.batching import estimate_structure_bytes
    from ase_bptt.relax.relaxer import rollout
    from ase_bptt.relax.steps import FixedStep

    dtype = C.torch_dtype(spec["dtype"])
    model = C.build_model(quick=False, device=spec["device"], dtype=dtype, name=spec.get("model", "adapt"))
    cells = [C.silicon_cell(spec["n_sites"]) for _ in range(spec["batch"])]
    for i, atoms in enumerate(cells):
        if i % 2:  # a vacancy in every other cell: the batch pads, as mixed defect sets do
            del atoms[0]
        atoms.rattle(0.05, seed=i)
    batch = Batch.from_atoms(cells).to(device=spec["device"], dtype=dtype)
    n_atoms = int(batch.mask.shape[1])
    kwargs = {"tol": 0.0, "max_steps": spec["frames"], "checkpoint_frames": spec["checkpoint"]}

    def run() -> None:
        if spec["grad"]:
            model.train()
            rollout(model, batch, FixedStep(ETA), **kwargs).positions.sum().backward()
        else:
            with torch.no_grad():
                rollout(model, batch, FixedStep(ETA), **kwargs)

    run()  # lazy set-up (kernels, thread pools) is not the batch's memory
    model.zero_grad(set_to_none=False)
    peak = C.peak_memory_mib(run, device=spec["device"])
    per = estimate_structure_bytes(
        n_atoms, model, grad=spec["grad"], frames=spec["frames"], checkpoint_frames=spec["checkpoint"]
    )
    estimate_mib = per * spec["batch"] / 2**20
    return {**spec, "n_atoms": n_atoms, **peak, "estimate_mib": estimate_mib, "ratio": peak["peak_mib"] / estimate_mib}


def main(argv: list[str] | None = None) -> dict:
    from ase_bptt.relax.batching import ESTIMATE_FACTOR

    parser = C.make_parser("bench_memory_estimate", __doc__.splitlines()[0])
    parser.add_argument("--model", choices=("adapt", "adapt-mi"), default="adapt", help="force model measured")
    args = C.finish_args(parser.parse_args(argv))
    if args.worker:
        C.worker_entry(args.worker, _measure)
        return {}
    common = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "model": args.model}
    specs = [{**cfg, **common} for cfg in _configs(args.quick)]
    if args.quick:  # in this process, the high-water mark reset before each: CI-sized
        rows = [_measure(spec) for spec in specs]
    else:
        rows = C.run_workers(__file__, specs)
    for r in rows:
        r["variant"] = "no_grad" if not r["grad"] else ("checkpoint_frames" if r["checkpoint"] else "naive")
    table = C.print_table(
        rows,
        [
            ("variant", "variant", "{}"),
            ("n_atoms", "atoms", "{}"),
            ("batch", "B", "{}"),
            ("frames", "k", "{}"),
            ("peak_mib", "measured MiB", "{:.1f}"),
            ("estimate_mib", "estimate MiB", "{:.1f}"),
            ("ratio", "measured/estimate", "{:.2f}"),
        ],
    )
    ratios = [r["ratio"] for r in rows]
    met = all(1 / ESTIMATE_FACTOR <= x <= 1.0 for x in ratios)
    line = (
        f"measured/estimate from {min(ratios):.2f} to {max(ratios):.2f} "
        f"(goal: within [1/{ESTIMATE_FACTOR:g}, 1]: {'met' if met else 'MISSED'})"
    )
    print(line)
    payload = {
        "benchmark": "bench_memory_estimate",
        "environment": C.environment(args),
        "results": rows,
        "goal": {"ratio_min": 1 / ESTIMATE_FACTOR, "ratio_max": 1.0},
        "goal_met": met,
        "table": table + "\n" + line,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

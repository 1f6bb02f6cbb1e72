"""BPTT memory and time: forward + backward of one rollout, naive vs checkpointed frames.

For 64- and 216-atom silicon vacancy cells (rattled; loss = Dq of the final
positions against the unrattled crystal) and k = 10, 25, 50, 75 frames
(``tol=0``, so every rollout takes exactly k frames), this measures

* peak memory of one forward + backward, each configuration in a fresh
  subprocess (CPU: resident-set high-water mark; CUDA: max_memory_allocated);
  ``--quick`` measures all its configurations in one subprocess;
* wall time, naive and checkpointed interleaved in one process (median of
  ``--repeats``);
* that every variant's parameter gradient equals the naive one.

Variants: ``naive`` (the whole graph is kept), ``checkpoint_frames`` (the
package's ``rollout(checkpoint_frames=True)``: a custom autograd Function
around every round(sqrt(k)) frames, run under no_grad and recomputed in
backward, ``ase_bptt/relax/recompute.py``), ``checkpoint_frames_1`` (the same
Function around every frame, ``checkpoint_frames=1``), and the baseline it
replaced, ``torch_checkpoint`` (non-reentrant ``torch.utils.checkpoint``
around every frame, built here from the package's frame function).

``--batch B [B ...]`` relaxes B such cells at once (each with its own rattle;
default 1), as fine-tuning does with a batch of relaxations.

Goal at k = 75: checkpointed peak <= 25% of naive, time <= 1.5x naive.

    python benchmarks/bench_bptt.py --threads 1
    python benchmarks/bench_bptt.py --device cuda --sizes 64 --frames 75 --batch 32 256
    python benchmarks/bench_bptt.py --quick
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

GOAL_MEMORY_FRACTION = 0.25
GOAL_TIME_RATIO = 1.5
ETA = 0.01  # A^2/eV: small enough that an untrained model's rollout stays near the crystal
VARIANTS = ("naive", "checkpoint_frames", "checkpoint_frames_1", "torch_checkpoint")


def _inputs(n_sites: int, spec: dict):
    from ase_bptt.batch import Batch
    from ase_bptt.relax.steps import FixedStep

    dtype = C.torch_dtype(spec["dtype"])
    model = C.build_model(quick=spec["quick"], device=spec["device"], dtype=dtype)
    model.train()  # as in fine-tuning (dropout is 0 in the default config)
    crystal = C.silicon_cell(n_sites)
    del crystal[0]  # vacancy
    cells = []
    for i in range(int(spec.get("batch", 1))):  # B copies, each rattled its own way
        atoms = crystal.copy()
        atoms.rattle(0.1, seed=2 + i)
        cells.append(atoms)
    batch = Batch.from_atoms(cells).to(device=spec["device"], dtype=dtype)
    reference = torch.as_tensor(crystal.positions, dtype=dtype, device=spec["device"])[None].expand(len(cells), -1, -1)
    return model, batch, reference, FixedStep(ETA)


def _frames(model, batch, rule, start: int, stop: int, carry):
    """Frames ``start..stop-1`` with the package's own frame function (tol=0: no structure stops)."""
    from ase_bptt.relax.rollout import relax_frame

    for f in range(start, stop):
        carry = relax_frame(model, batch, rule, f, carry, tol=0.0)
    return carry


def _segment_rollout(model, batch, rule, *, k: int, segment: int):
    """k frames, ``torch.utils.checkpoint`` (non-reentrant) around every ``segment`` frames."""
    from ase_bptt.relax.rollout import Carry

    carry = Carry.start(rule, batch, batch.positions)
    for start in range(0, k, segment):
        fn = functools.partial(_frames, model, batch, rule, start, min(k, start + segment))
        carry = checkpoint(fn, carry, use_reentrant=False)
    return carry.positions


def make_step(variant: str, model, batch, reference, rule, k: int):
    """A callable doing one forward + backward of a k-frame rollout."""
    from ase_bptt.metrics import dq
    from ase_bptt.relax.relaxer import rollout

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if variant == "torch_checkpoint":
            final = _segment_rollout(model, batch, rule, k=k, segment=1)
        else:
            ck = {"naive": False, "checkpoint_frames": True, "checkpoint_frames_1": 1}[variant]
            final = rollout(model, batch, rule, tol=0.0, max_steps=k, checkpoint_frames=ck).positions
        dq(final, reference, batch).sum().backward()

    return step


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in model.parameters() if p.grad is not None])


def worker(spec: dict) -> dict:
    """Child process: peak memory of one forward + backward for one (n_sites, k, variant).

    With ``spec["configs"]`` (--quick only) it measures several in turn in this one process, to save
    interpreter start-ups; freed heap is trimmed and the high-water mark reset before each.
    """
    if "configs" in spec:
        shared = {k: v for k, v in spec.items() if k != "configs"}
        return {"results": [worker({**shared, **c}) for c in spec["configs"]]}
    model, batch, reference, rule = _inputs(spec["n_sites"], spec)
    # Warm up lazily initialised kernels and workspaces on a 1-frame rollout, outside the measurement.
    make_step(spec["variant"], model, batch, reference, rule, 1)()
    model.zero_grad(set_to_none=True)
    mem = C.peak_memory_mib(make_step(spec["variant"], model, batch, reference, rule, spec["k"]), device=spec["device"])
    return mem


def main(argv: list[str] | None = None) -> dict:
    parser = C.make_parser("bench_bptt", __doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="sites per cell before the vacancy (default 64 216)"
    )
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="k values (default 10 25 50 75)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1], help="structures relaxed at once (default 1); one row set each"
    )
    args = C.finish_args(parser.parse_args(argv))
    if args.worker:
        C.worker_entry(args.worker, worker)
        return {}
    sizes = args.sizes or ([8] if args.quick else [64, 216])
    frames = args.frames or ([2, 12] if args.quick else [10, 25, 50, 75])
    variants = list(dict.fromkeys(["naive"] + list(args.variants)))
    if args.quick and args.variants == list(VARIANTS):
        variants = ["naive", "checkpoint_frames"]
    base_spec = {"device": args.device, "dtype": args.dtype, "quick": args.quick, "threads": torch.get_num_threads()}

    if min(args.batch) < 1:
        raise SystemExit("--batch must be positive")
    rows = []
    for n, b in ((n, b) for n in sizes for b in args.batch):
        model, batch, reference, rule = _inputs(n, {**base_spec, "batch": b})
        n_atoms = int(batch.mask[0].sum())
        for k in frames:
            steps = {v: make_step(v, model, batch, reference, rule, k) for v in variants}
            times = C.interleaved_times(steps, repeats=args.repeats, warmup=1, device=args.device)
            grads = {}
            for v in variants:
                steps[v]()
                grads[v] = _flat_grad(model)
            for v in variants:
                err = float((grads[v] - grads["naive"]).norm() / grads["naive"].norm().clamp(min=1e-300))
                rows.append(
                    {
                        "n_sites": n,
                        "n_atoms": n_atoms,
                        "batch": b,
                        "k": k,
                        "variant": v,
                        "time": C.summarize(times[v]),
                        "grad_rel_error_vs_naive": err,
                    }
                )
            print(
                f"  timed n={n_atoms} B={b} k={k}: "
                + ", ".join(f"{v} {C.summarize(times[v])['median_s']:.3f} s" for v in variants),
                flush=True,
            )
    # Peak memory: a fresh interpreter per configuration (after the timing, so they never compete with it).
    specs = [
        {**base_spec, "n_sites": r["n_sites"], "batch": r["batch"], "k": r["k"], "variant": r["variant"]} for r in rows
    ]
    if args.quick:  # one interpreter for all (start-up dominates a --quick run); full runs: one each
        configs = [{k: sp[k] for k in ("n_sites", "batch", "k", "variant")} for sp in specs]
        mems = C.run_worker(__file__, {**base_spec, "configs": configs})["results"]
    else:
        mems = C.run_workers(__file__, specs, parallel=2)
    for r, mem in zip(rows, mems):
        r["peak_mib"] = mem["peak_mib"]
        r["memory_method"] = mem["method"]
        r["memory_detail"] = mem
    for r in rows:
        naive = next(
            x
            for x in rows
            if (x["n_atoms"], x["batch"], x["k"]) == (r["n_atoms"], r["batch"], r["k"]) and x["variant"] == "naive"
        )
        r["memory_fraction_of_naive"] = r["peak_mib"] / naive["peak_mib"] if naive["peak_mib"] > 0 else None
        r["time_ratio_to_naive"] = r["time"]["median_s"] / naive["time"]["median_s"]

    table = C.print_table(
        [{**r, "t": r["time"]["median_s"]} for r in rows],
        [
            ("n_atoms", "atoms", "{}"),
            ("batch", "B", "{}"),
            ("k", "k", "{}"),
            ("variant", "variant", "{}"),
            ("peak_mib", "peak MiB", "{:.1f}"),
            ("memory_fraction_of_naive", "mem/naive", "{:.3f}"),
            ("t", "time s", "{:.3f}"),
            ("time_ratio_to_naive", "time/naive", "{:.2f}"),
            ("grad_rel_error_vs_naive", "grad err", "{:.1e}"),
        ],
    )
    k_goal = max(frames)
    goals = {}
    for v in variants:
        if v == "naive":
            continue
        at_k = [r for r in rows if r["variant"] == v and r["k"] == k_goal]
        key = (lambda r: r["n_atoms"]) if args.batch == [1] else (lambda r: f"{r['n_atoms']} atoms x B={r['batch']}")
        goals[v] = {
            "k": k_goal,
            "memory_fraction_of_naive": {key(r): r["memory_fraction_of_naive"] for r in at_k},
            "time_ratio_to_naive": {key(r): r["time_ratio_to_naive"] for r in at_k},
            "met": all(
                (r["memory_fraction_of_naive"] or 0) <= GOAL_MEMORY_FRACTION
                and r["time_ratio_to_naive"] <= GOAL_TIME_RATIO
                for r in at_k
            ),
        }
    for v, g in goals.items():
        print(
            f"goal at k={g['k']} ({v}): memory <= {GOAL_MEMORY_FRACTION:.0%} of naive and time <= "
            f"{GOAL_TIME_RATIO}x: {'met' if g['met'] else 'MISSED'}"
        )
    payload = {
        "benchmark": "bench_bptt",
        "environment": C.environment(args),
        "model_parameters": C.n_parameters(model),
        "eta": ETA,
        "goal": {"memory_fraction_max": GOAL_MEMORY_FRACTION, "time_ratio_max": GOAL_TIME_RATIO},
        "results": rows,
        "goals": goals,
        "table": table,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

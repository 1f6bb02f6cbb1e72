"""BPTT cost of the universal-model backends: one optimiser step through k frames, naive and checkpointed.

For batches of 1 and 2 rattled 64-site silicon cells with a vacancy (63 atoms;
loss = Dq of the final positions against the unrattled crystal, k = 10 frames
of ``FixedStep``, ``tol=0`` so every rollout takes all k), per model

* ``adapt-mi``: the package's own ADAPT-MI (default size), the baseline;
* ``chgnet``: CHGNet 0.3.0 through ``load_universal_model("chgnet")``;
* ``sevenn``: SevenNet-0 through ``load_universal_model("sevenn")``;

this measures one optimiser step (rollout, backward, AdamW step with lr 0 so
the weights stay put), naive and with ``checkpoint_frames=True``:

* wall time, every (model, variant) of a batch size interleaved in one
  process (median of ``--repeats``), and its ratio to ADAPT-MI's naive step
  and to the model's own naive step;
* peak memory of one step, each configuration in a fresh subprocess (CPU:
  resident-set high-water mark; CUDA: max_memory_allocated; see
  ``_common.py``), its ratio to naive, and the floats one atom keeps per
  frame (what ``memory_floats`` of a backend records for the batch-size
  estimate); the same for a relaxation without gradients (one structure);
* the batch-size estimate (``ase_bptt.relax.batching.estimate_structure_bytes``)
  against the measured peak;
* that the checkpointed gradient equals the naive one.

``--quick`` runs small untrained models (the same code paths) through 3 frames.

    python benchmarks/bench_backends.py --threads 1
    python benchmarks/bench_backends.py --device cuda --batch 1 8
    python benchmarks/bench_backends.py --quick
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

MODELS = ("adapt-mi", "chgnet", "sevenn")
VARIANTS = ("naive", "checkpoint_frames")
ETA = 0.01  # A^2/eV: a 10-frame rollout stays near the crystal


def build(name: str, *, quick: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``name`` in training mode (quick: small untrained backends, tiny ADAPT-MI)."""
    if name == "adapt-mi":
        model = C.build_model(quick=quick, device=device, dtype=dtype, name="adapt-mi")
    else:
        from ase_bptt.backends import backend_class
        from ase_bptt.models.universal import load_universal_model

        torch.manual_seed(0)
        architecture = backend_class(name).small_architecture if quick else None
        model = load_universal_model(name, architecture=architecture, device=device, dtype=dtype)
    return model.train()


def _inputs(spec: dict):
    from ase_bptt.batch import Batch

    dtype = C.torch_dtype(spec["dtype"])
    crystal = C.silicon_cell(spec["n_sites"])
    del crystal[0]  # vacancy
    cells = []
    for i in range(spec["batch"]):
        atoms = crystal.copy()
        atoms.rattle(0.05, seed=2 + i)
        cells.append(atoms)
    batch = Batch.from_atoms(cells).to(device=spec["device"], dtype=dtype)
    reference = torch.as_tensor(crystal.positions, dtype=dtype, device=spec["device"])[None].expand(len(cells), -1, -1)
    return batch, reference


def make_step(model, batch, reference, *, k: int, checkpoint: bool):
    """One optimiser step: rollout, Dq loss, backward, AdamW (lr 0: timed, weights unchanged)."""
    from ase_bptt.metrics import dq
    from ase_bptt.relax.rollout import rollout
    from ase_bptt.relax.steps import FixedStep

    rule = FixedStep(ETA)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=0.0)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        final = rollout(model, batch, rule, tol=0.0, max_steps=k, checkpoint_frames=checkpoint).positions
        dq(final, reference, batch).sum().backward()
        optimiser.step()

    return step


def worker(spec: dict) -> dict:
    """Child process: peak memory of one step (or of a relaxation without gradients) for one configuration."""
    if "configs" in spec:
        shared = {k: v for k, v in spec.items() if k != "configs"}
        return {"results": [worker({**shared, **c}) for c in spec["configs"]]}
    from ase_bptt.relax.rollout import rollout
    from ase_bptt.relax.steps import FixedStep

    model = build(spec["model"], quick=spec["quick"], device=spec["device"], dtype=C.torch_dtype(spec["dtype"]))
    batch, reference = _inputs(spec)
    if spec["variant"] == "no_grad":
        model.eval()

        def run() -> None:
            with torch.no_grad():
                rollout(model, batch, FixedStep(ETA), tol=0.0, max_steps=spec["k"])

        run()  # warm-up: lazily built kernels and the neighbour graph are not the rollout's memory
        return C.peak_memory_mib(run, device=spec["device"])
    step = make_step(model, batch, reference, k=spec["k"], checkpoint=spec["variant"] == "checkpoint_frames")
    make_step(model, batch, reference, k=1, checkpoint=False)()  # warm-up, outside the measurement
    return C.peak_memory_mib(step, device=spec["device"])


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in model.parameters() if p.grad is not None])


def _estimate_mib(model, n_atoms: int, row: dict, k: int) -> float:
    from ase_bptt.relax.batching import estimate_structure_bytes

    grad = row["variant"] != "no_grad"
    per = estimate_structure_bytes(
        n_atoms, model, grad=grad, frames=k, checkpoint_frames=row["variant"] == "checkpoint_frames"
    )
    return per * row["batch"] / 2**20


def time_rows(args, base_spec: dict, models: dict, k: int) -> list[dict]:
    """Timed rows for every batch size: all models and variants of one batch size interleaved."""
    rows = []
    for b in args.batch:
        batch, reference = _inputs({**base_spec, "batch": b})
        steps, grads = {}, {}
        for name, model in models.items():
            for v in VARIANTS:
                steps[(name, v)] = make_step(model, batch, reference, k=k, checkpoint=v == "checkpoint_frames")
        times = C.interleaved_times(steps, repeats=args.repeats, warmup=1, device=args.device)
        for (name, v), step in steps.items():
            step()
            grads[(name, v)] = _grad(models[name])
        for name, v in steps:
            naive = grads[(name, "naive")]
            err = float((grads[(name, v)] - naive).norm() / naive.norm().clamp(min=1e-300))
            rows.append(
                {
                    "model": name,
                    "batch": b,
                    "n_atoms": int(batch.mask[0].sum()),
                    "k": k,
                    "variant": v,
                    "time": C.summarize(times[(name, v)]),
                    "grad_rel_error_vs_naive": err,
                }
            )
        medians = ", ".join(f"{n}/{v} {C.summarize(times[(n, v)])['median_s']:.2f} s" for n, v in steps)
        print(f"  timed B={b} k={k}: {medians}", flush=True)
    return rows


def measure_memory(args, base_spec: dict, names: list[str], k: int) -> dict[tuple, dict]:
    """Peak memory of every (model, batch, variant), a fresh interpreter each, one at a time.

    Run before the timing: a parent that has timed SevenNet-0 naive at B = 2 holds gigabytes it
    freed but glibc kept, and a worker beside it was killed for memory on the 23 GB test machine.
    """
    keys = [(m, b, v) for b in args.batch for m in names for v in VARIANTS] + [(m, 1, "no_grad") for m in names]
    configs = [{"model": m, "batch": b, "variant": v, "k": k} for m, b, v in keys]
    if args.quick:  # one interpreter for all (start-up dominates a --quick run)
        mems = C.run_worker(__file__, {**base_spec, "configs": configs})["results"]
    else:
        mems = C.run_workers(__file__, [{**base_spec, **c} for c in configs], parallel=1)
    return dict(zip(keys, mems))


def add_memory(rows: list[dict], mems: dict[tuple, dict], models: dict, k: int) -> list[dict]:
    """Peak memory, floats per atom and frame and the estimate per row, plus one no-gradient row per model."""
    all_rows = rows + [{"model": m, "batch": 1, "variant": "no_grad", "k": k, "time": None} for m in models]
    n_atoms = rows[0]["n_atoms"]
    for r in all_rows:
        mem = mems[(r["model"], r["batch"], r["variant"])]
        r["n_atoms"] = n_atoms
        r["peak_mib"] = mem["peak_mib"]
        r["memory_method"] = mem["method"]
        itemsize = next(models[r["model"]].parameters()).element_size()
        frames = 1 if r["variant"] == "no_grad" else k + 1  # kept graphs (+ one frame of gradients in backward)
        r["floats_per_atom_frame"] = r["peak_mib"] * 2**20 / (r["batch"] * n_atoms * frames * itemsize)
        r["estimate_mib"] = _estimate_mib(models[r["model"]], n_atoms, r, k)
        r["peak_over_estimate"] = r["peak_mib"] / r["estimate_mib"] if r["estimate_mib"] else None
    return all_rows


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        if r["variant"] == "no_grad":
            continue
        same = [x for x in rows if x["batch"] == r["batch"] and x["variant"] == "naive"]
        own = next(x for x in same if x["model"] == r["model"])
        base = next(x for x in same if x["model"] == "adapt-mi")
        t = r["time"]["median_s"]
        r["time_ratio_to_naive"] = t / own["time"]["median_s"]
        r["memory_fraction_of_naive"] = r["peak_mib"] / own["peak_mib"] if own["peak_mib"] > 0 else None
        r["time_ratio_to_adapt_mi"] = t / base["time"]["median_s"]
        r["memory_ratio_to_adapt_mi"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None


def main(argv: list[str] | None = None) -> dict:
    parser = C.make_parser("bench_backends", __doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="structures per step (default 1 2)")
    parser.add_argument("--frames", type=int, default=10, help="frames per rollout (default 10)")
    args = C.finish_args(parser.parse_args(argv))
    if args.worker:
        C.worker_entry(args.worker, worker)
        return {}
    if min(args.batch) < 1 or args.frames < 1:
        raise SystemExit("--batch and --frames must be positive")
    names = list(dict.fromkeys(["adapt-mi"] + list(args.models)))  # the baseline is always measured
    k = 3 if args.quick else args.frames
    base_spec = {
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "n_sites": 64,
    }
    load = [os.getloadavg()[0]]
    mems = measure_memory(args, base_spec, names, k)
    dtype = C.torch_dtype(args.dtype)
    models = {n: build(n, quick=args.quick, device=args.device, dtype=dtype) for n in names}
    rows = add_memory(time_rows(args, base_spec, models, k), mems, models, k)
    add_ratios(rows)
    load.append(os.getloadavg()[0])
    table = C.print_table(
        [{**r, "t": None if r["time"] is None else r["time"]["median_s"]} for r in rows],
        [
            ("model", "model", "{}"),
            ("batch", "B", "{}"),
            ("variant", "variant", "{}"),
            ("t", "time s", "{:.3f}"),
            ("time_ratio_to_adapt_mi", "t/ADAPT-MI", "{:.1f}"),
            ("time_ratio_to_naive", "t/naive", "{:.2f}"),
            ("peak_mib", "peak MiB", "{:.1f}"),
            ("memory_ratio_to_adapt_mi", "mem/ADAPT-MI", "{:.1f}"),
            ("memory_fraction_of_naive", "mem/naive", "{:.3f}"),
            ("floats_per_atom_frame", "floats/atom/frame", "{:.0f}"),
            ("peak_over_estimate", "peak/estimate", "{:.2f}"),
            ("grad_rel_error_vs_naive", "grad err", "{:.1e}"),
        ],
    )
    payload = {
        "benchmark": "bench_backends",
        "environment": C.environment(args),
        "model_parameters": {n: C.n_parameters(m) for n, m in models.items()},
        "eta": ETA,
        "frames": k,
        "load_average_1min": {"start": load[0], "end": load[1]},
        "results": rows,
        "table": table,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

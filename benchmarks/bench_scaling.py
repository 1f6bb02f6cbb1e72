"""Size scaling: model forward and one BPTT frame for silicon supercells of growing size.

For N = 64, 216, 512 and 1000 atoms (diamond Si, 2-5 conventional cells per
side, lightly rattled) this times

* ``forward``: ``model(batch)`` under ``torch.no_grad()`` (what a relaxation pays per frame);
* ``bptt_frame``: one differentiable frame, ``rollout(..., max_steps=1, tol=0)``,
  then ``backward`` of Dq against the start (what training pays per frame),

and fits the exponent of time against N by log-log least squares over the
largest sizes (attention is all-pairs, so ~2 is expected once the N^2 term
dominates; at small N the per-atom MLPs, linear in N, dominate).

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def measure(n_atoms: int, model, args) -> dict:
    from ase_bptt.batch import Batch
    from ase_bptt.metrics import dq
    from ase_bptt.relax.relaxer import rollout
    from ase_bptt.relax.steps import FixedStep

    dtype = C.torch_dtype(args.dtype)
    atoms = C.silicon_cell(n_atoms)
    atoms.rattle(0.05, seed=1)
    batch = Batch.from_atoms(atoms).to(device=args.device, dtype=dtype)
    step = FixedStep(0.01).to(device=args.device, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def bptt_frame() -> None:
        model.zero_grad(set_to_none=True)
        result = rollout(model, batch, step, tol=0.0, max_steps=1)
        dq(result.positions, batch.positions, batch).sum().backward()

    inner = 1 if n_atoms >= 512 else (2 if args.quick else 5)

    def loop(fn):
        def run() -> None:
            for _ in range(inner):
                fn()

        return run

    times = C.interleaved_times(
        {"forward": loop(forward), "bptt_frame": loop(bptt_frame)}, repeats=args.repeats, warmup=1, device=args.device
    )
    fwd = C.summarize([t / inner for t in times["forward"]])
    frame = C.summarize([t / inner for t in times["bptt_frame"]])
    return {
        "n_atoms": len(atoms),
        "forward": fwd,
        "bptt_frame": frame,
        "forward_us_per_atom": fwd["median_s"] / len(atoms) * 1e6,
        "bptt_frame_us_per_atom": frame["median_s"] / len(atoms) * 1e6,
        "bptt_over_forward": frame["median_s"] / fwd["median_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = C.make_parser("bench_scaling", __doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="atom counts (default 64 216 512 1000; quick 8 16 64)"
    )
    parser.add_argument(
        "--fit-largest", type=int, default=3, help="how many of the largest sizes the exponent fit uses (default 3)"
    )
    args = C.finish_args(parser.parse_args(argv))
    sizes = args.sizes or ([8, 16, 64] if args.quick else [64, 216, 512, 1000])
    model = C.build_model(quick=args.quick, device=args.device, dtype=C.torch_dtype(args.dtype))
    rows = [measure(n, model, args) for n in sizes]
    ns = [r["n_atoms"] for r in rows]
    k = max(2, min(args.fit_largest, len(rows)))
    fits = {
        "fit_sizes": ns[-k:],
        "forward_exponent": C.fit_exponent(ns[-k:], [r["forward"]["median_s"] for r in rows[-k:]]),
        "bptt_frame_exponent": C.fit_exponent(ns[-k:], [r["bptt_frame"]["median_s"] for r in rows[-k:]]),
        "forward_exponent_all_sizes": C.fit_exponent(ns, [r["forward"]["median_s"] for r in rows]),
        "bptt_frame_exponent_all_sizes": C.fit_exponent(ns, [r["bptt_frame"]["median_s"] for r in rows]),
    }
    table = C.print_table(
        [
            {
                "n": r["n_atoms"],
                "fwd": r["forward"]["median_s"] * 1e3,
                "fwd_pa": r["forward_us_per_atom"],
                "bptt": r["bptt_frame"]["median_s"] * 1e3,
                "bptt_pa": r["bptt_frame_us_per_atom"],
                "x": r["bptt_over_forward"],
            }
            for r in rows
        ],
        [
            ("n", "atoms", "{}"),
            ("fwd", "forward ms", "{:.2f}"),
            ("fwd_pa", "us/atom", "{:.2f}"),
            ("bptt", "BPTT frame ms", "{:.2f}"),
            ("bptt_pa", "us/atom", "{:.2f}"),
            ("x", "frame/fwd", "{:.2f}"),
        ],
    )
    line = (
        f"fitted exponent over N = {fits['fit_sizes']}: forward {fits['forward_exponent']:.2f}, "
        f"BPTT frame {fits['bptt_frame_exponent']:.2f} (all sizes: {fits['forward_exponent_all_sizes']:.2f}, "
        f"{fits['bptt_frame_exponent_all_sizes']:.2f})"
    )
    print(line)
    payload = {
        "benchmark": "bench_scaling",
        "environment": C.environment(args),
        "model_parameters": C.n_parameters(model),
        "results": rows,
        "fit": fits,
        "table": table + "\n" + line,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

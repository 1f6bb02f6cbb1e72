"""Calculator overhead: ``atoms.get_forces()`` through BPTTCalculator vs the raw model forward.

Both sides evaluate the same untrained ADAPT (default config) on the same
structure. The baseline is ``model(batch)`` under ``torch.no_grad()`` on a
Batch built once; the calculator side is what an ASE optimizer pays per step:
``calc.reset(); atoms.get_forces()`` (the reset keeps ASE's result cache from
hiding the cost), i.e. Batch construction, host/device copies, the forward,
and conversion back to NumPy. Goal: ratio <= 1.2.

    python benchmarks/bench_calculator.py            # 64 and 216 atoms, 5 repeats
    python benchmarks/bench_calculator.py --quick    # harness check, a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

GOAL_RATIO = 1.2


def measure(n_atoms: int, args) -> dict:
    from ase_bptt.batch import Batch
    from ase_bptt.calculator import BPTTCalculator

    dtype = C.torch_dtype(args.dtype)
    model = C.build_model(quick=args.quick, device=args.device, dtype=dtype)
    atoms = C.silicon_cell(n_atoms)
    atoms.rattle(0.05, seed=1)
    calc = BPTTCalculator(model, device=args.device, dtype=dtype)
    atoms.calc = calc
    batch = Batch.from_atoms(atoms, constraints=False).to(device=args.device, dtype=dtype)

    def raw() -> None:
        with torch.no_grad():
            model(batch)

    def through_calculator() -> None:
        calc.reset()
        atoms.get_forces()

    # Many calls per sample: one forward on 64 atoms is ~ms, below timer noise on a shared machine.
    inner = 3 if args.quick else 20

    def loop(fn):
        def run() -> None:
            for _ in range(inner):
                fn()

        return run

    times = C.interleaved_times(
        {"raw": loop(raw), "calculator": loop(through_calculator)},
        repeats=args.repeats,
        warmup=1,
        device=args.device,
    )
    raw_s = C.summarize([t / inner for t in times["raw"]])
    calc_s = C.summarize([t / inner for t in times["calculator"]])
    # Same numbers both ways (the calculator is a thin wrapper, not a different model).
    calc.reset()
    forces_calc = torch.as_tensor(atoms.get_forces())
    with torch.no_grad():
        forces_raw = model(batch).forces[0].detach().cpu().double()
    return {
        "n_atoms": len(atoms),
        "raw_forward": raw_s,
        "calculator_get_forces": calc_s,
        "ratio": calc_s["median_s"] / raw_s["median_s"],
        # Each repeat times both back to back: the median of those paired ratios shrugs off a busy spell.
        "paired_ratio_median": C.summarize([c / r for c, r in zip(times["calculator"], times["raw"])])["median_s"],
        "max_abs_force_difference": float((forces_calc - forces_raw).abs().max()),
        "calls_per_sample": inner,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = C.make_parser("bench_calculator", __doc__.splitlines()[0])
    args = C.finish_args(parser.parse_args(argv))
    sizes = [8, 64] if args.quick else [64, 216]
    rows = []
    for n in sizes:
        rows.append(measure(n, args))
    table_rows = [
        {
            "n": r["n_atoms"],
            "raw": r["raw_forward"]["median_s"] * 1e3,
            "calc": r["calculator_get_forces"]["median_s"] * 1e3,
            "ratio": r["ratio"],
            "paired": r["paired_ratio_median"],
            "ok": "yes" if r["ratio"] <= GOAL_RATIO else "no",
        }
        for r in rows
    ]
    table = C.print_table(
        table_rows,
        [
            ("n", "sites", "{}"),
            ("raw", "raw forward ms", "{:.3f}"),
            ("calc", "get_forces ms", "{:.3f}"),
            ("ratio", "ratio", "{:.2f}"),
            ("paired", "paired ratio", "{:.2f}"),
            ("ok", f"<= {GOAL_RATIO}", "{}"),
        ],
    )
    payload = {
        "benchmark": "bench_calculator",
        "environment": C.environment(args),
        "goal": {"ratio_max": GOAL_RATIO},
        "results": rows,
        "goal_met": all(r["ratio"] <= GOAL_RATIO for r in rows),
        "table": table,
    }
    C.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()

"""The user's path, measured: the README's commands with no options, timed, and what they buy.

    python -m studies.user_path --files gaas-files/train --test-files gaas-files/test --out runs/gaas
    python -m studies.user_path --generate si-defects --seed 21 --out runs/si      # the built-in data
    python -m studies.user_path --db si.db --out runs/si                           # an existing database

Runs, as separate processes and exactly as a user types them (no option beyond the paths):

    ase-bptt import FILES --db traj.db [--val 0.15 --test 0]; ase-bptt import TEST_FILES --db traj.db --split test
    ase-bptt finetune traj.db -o model.pt
    ase-bptt evaluate model-pretrained.pt model.pt --db traj.db -o report/

(``--generate`` makes the database with ``ase-bptt generate RECIPE traj.db -n N --val 0.15 --test 0.15
--seed S`` instead of importing; its time is reported apart, since generating reference data is not part
of a user's path.) Writes ``results.json`` to ``--out``: the wall time of each command, and from the
report, for the tuned model as exported against the pretrained model's best fixed step (eta chosen on
val) and its ASE FIRE: the ratio of the mean test Dq, the median of the per-structure ratios, the
fraction of structures improved, and the force and energy MAE of both models on the test frames.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ase_bptt.evaluation.compare import ratio_stats


def run(args: list[str], cwd: Path, log) -> float:
    """One ``ase-bptt`` command in ``cwd``; its wall time (s). Its output goes to the log."""
    start = time.perf_counter()
    print(f"$ ase-bptt {' '.join(args)}", file=log, flush=True)
    proc = subprocess.run([sys.executable, "-m", "ase_bptt.cli", *args], cwd=cwd, stdout=log, stderr=log)
    if proc.returncode:
        sys.exit(f"ase-bptt {' '.join(args)} failed (exit {proc.returncode}); see {log.name}")
    return time.perf_counter() - start


def compare(tuned: list[float], base: list[float]) -> dict[str, float]:
    """Mean ratio, median per-structure ratio and the fraction improved of ``tuned`` against ``base``."""
    stats = ratio_stats(tuned, base)
    return {key: stats[key] for key in ("mean_ratio", "median_ratio", "improved")}


def summarise(report: dict) -> dict:
    pre, tuned = report["checkpoints"]
    own = tuned["own_rule"]["per_structure"]
    out = {
        "n_test": report["n_structures"],
        "test_dq_mean": {
            "do_nothing": report["do_nothing"]["dq"]["mean"],
            "pretrained_ase_fire": pre["fire"]["dq"]["mean"],
            "pretrained_best_fixed_step": pre["fixed_step_selected"]["dq"]["mean"],
            "tuned_as_exported": tuned["own_rule"]["dq"]["mean"],
            "tuned_ase_fire": tuned["fire"]["dq"]["mean"],
        },
        "tuned_relax": tuned["relax"],
        "vs_best_fixed_step": compare(own, pre["fixed_step_selected"]["per_structure"]),
        "vs_ase_fire": compare(own, pre["fire"]["per_structure"]),
        "force_mae": {"pretrained": pre["forces"]["mae"], "tuned": tuned["forces"]["mae"]},
        "energy_mae_mev_per_atom": {
            "pretrained": pre["forces"]["energy_mae_mev_per_atom"],
            "tuned": tuned["forces"]["energy_mae_mev_per_atom"],
        },
    }
    for key in ("force_mae", "energy_mae_mev_per_atom"):
        a, b = out[key]["pretrained"], out[key]["tuned"]
        out[key]["ratio"] = b / a if a and b is not None else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", type=Path, help="relaxations to import (train and val)")
    src.add_argument("--generate", help="a built-in recipe of `ase-bptt generate`")
    src.add_argument("--db", type=Path, help="an existing database (copied)")
    p.add_argument("--test-files", type=Path, help="the user's own test relaxations (import --split test)")
    p.add_argument("-n", type=int, default=150, help="relaxations to generate")
    p.add_argument("--seed", type=int, default=21, help="seed of the generated data")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    load = os.getloadavg()[0]
    with open(a.out / "commands.log", "w") as log:
        if a.generate:
            if not (a.out / "traj.db").exists():
                split = ["--val", "0.15", "--test", "0.15", "--seed", str(a.seed), "--workers", "2"]
                times["generate (not the user's path)"] = run(
                    ["-q", "generate", a.generate, "traj.db", "-n", str(a.n), *split], a.out, log
                )
        elif a.db:
            shutil.copyfile(a.db, a.out / "traj.db")
        else:
            split = ["--val", "0.15", "--test", "0"] if a.test_files else []
            times["import"] = run(["-q", "import", str(a.files.resolve()), "--db", "traj.db", *split], a.out, log)
            if a.test_files:
                test = ["-q", "import", str(a.test_files.resolve()), "--db", "traj.db", "--split", "test"]
                times["import"] += run(test, a.out, log)
        times["finetune"] = run(["finetune", "traj.db", "-o", "model.pt"], a.out, log)
        args = ["evaluate", "model-pretrained.pt", "model.pt", "--db", "traj.db", "-o", "report"]
        times["evaluate"] = run(args, a.out, log)
    report = json.loads((a.out / "report" / "report.json").read_text())
    user = sum(v for k, v in times.items() if not k.startswith("generate"))
    results = {
        "commands": "studies/user_path.py " + " ".join(sys.argv[1:]),
        "wall_s": {**times, "user_path_total": user},
        "load_average_at_start": load,
        "cpus": os.cpu_count(),
        **summarise(report),
    }
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

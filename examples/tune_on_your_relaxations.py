"""Tune a model on a folder of your own relaxations with the Python API, and print what it buys.

    python examples/tune_on_your_relaxations.py vasp_runs/ --work tuned/

The README's command-line workflow as Python: import every relaxation under the folder (one per file: VASP
``vasprun.xml``/``OUTCAR``, ``.traj``, extxyz, ...; val and test held out per relaxation), fine-tune with the
default recipe (it pretrains first and prints every choice it makes from your data), evaluate the pretrained
and the tuned model on the test split, and print the table with the ratios, their medians, the fraction of
structures improved and both models' force and energy errors. ``--recipe quick`` is a smoke run.
The tuned model is ``WORK/model.pt``: ``BPTTCalculator("WORK/model.pt")`` in ASE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ase_bptt import evaluate, finetune
from ase_bptt.data import SplitFractions, TrajectoryDB, import_paths
from ase_bptt.evaluation import summary_text
from ase_bptt.train.presets import finetune_config, training_recipe_names


def tune(folder: Path, work: Path, *, recipe: str = "default", val: float = 0.1, test: float = 0.1) -> dict:
    """Import ``folder`` into ``work/traj.db``, tune ``work/model.pt``, evaluate into ``work/report``."""
    config = finetune_config(recipe)  # checked before anything is written
    db = TrajectoryDB(work / "traj.db")
    print(import_paths(folder, db, splits=SplitFractions(val=val, test=test)))
    model = finetune(db, work / "model.pt", config=config, progress=False)
    return evaluate([work / "model-pretrained.pt", model], db, work / "report", progress=False, plots=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="your relaxations, one per file (folders are walked)")
    parser.add_argument("--work", type=Path, required=True, help="new folder for traj.db, model.pt and report/")
    parser.add_argument("--recipe", default="default", choices=training_recipe_names())
    parser.add_argument("--val", type=float, default=0.1, help="fraction of relaxations for val (default 0.1)")
    parser.add_argument("--test", type=float, default=0.1, help="fraction of relaxations for test (default 0.1)")
    args = parser.parse_args(argv)
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"{args.work} is not empty; choose a new folder (nothing is overwritten)")
    args.work.mkdir(parents=True, exist_ok=True)
    result = tune(args.folder, args.work, recipe=args.recipe, val=args.val, test=args.test)
    print(summary_text(result))


if __name__ == "__main__":
    main()

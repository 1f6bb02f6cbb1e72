"""``python -m ase_bptt.cli``: the ``ase-bptt`` command without its installed entry point.

Used by ``torchrun ... -m ase_bptt.cli`` (docs/training.md), ``benchmarks/run_gpu_checks.sh`` and a
checkout on ``PYTHONPATH`` where the package is not installed.
"""

import sys

from ase_bptt.cli import main

sys.exit(main())

"""Research scripts: the measurements behind docs/results.md, each with its committed results.

Run one from the repository root as a module, e.g. ``python -m studies.reproduce_paper --quick --out /tmp/q``.
They use the package's public API (``tests/test_studies_public_api.py``); ``common`` and
``si_defects_reference`` are the helpers they share.
"""

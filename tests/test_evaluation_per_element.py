"""report.json's ``per_element``: mean Dq per method over the structures containing each element."""

from __future__ import annotations

import pytest

from ase_bptt.evaluation.compare import per_element


def _entry(values, **extra):
    finite = [v for v in values if v is not None]
    dq = {"mean": sum(finite) / len(finite), "median": 0.0, "per_label": {}}
    return {"dq": dq, "per_structure": values, **extra}


def test_per_element_by_hand():
    result = {
        "structures": [
            {"traj_id": "a", "label": "sub:Ni", "elements": ["Cu", "Ni"]},
            {"traj_id": "b", "label": "vacancy", "elements": ["Cu"]},
            {"traj_id": "c", "label": "sub:Ni+sub:Pd", "elements": ["Cu", "Ni", "Pd"]},
        ],
        "do_nothing": _entry([1.0, 2.0, 3.0]),
        "baselines": [_entry([None, 4.0, 6.0], name="emt", calculator="EMT")],
        "checkpoints": [{"name": "bptt", "own_rule": _entry([0.5, 1.0, 2.0], rule="fixed")}],
    }
    got = per_element(result)
    assert got["counts"] == {"Cu": 3, "Ni": 2, "Pd": 1}
    by_method = {(m["method"], m["model"]): m["dq"] for m in got["methods"]}
    assert by_method[("do nothing (initial structure)", "-")] == {"Cu": 2.0, "Ni": 2.0, "Pd": 3.0}
    # the baseline skipped structure a: Ni is then c alone
    assert by_method[("ASE FIRE with emt", "EMT")] == {"Cu": 5.0, "Ni": 6.0, "Pd": 6.0}
    assert by_method[("as exported (fixed)", "bptt")] == pytest.approx({"Cu": 3.5 / 3, "Ni": 1.25, "Pd": 2.0})
    # a result from before the structures listed their elements
    for s in result["structures"]:
        del s["elements"]
    assert per_element(result) == {}

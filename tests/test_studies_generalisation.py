"""studies/generalisation.py: the groups of each protocol, and a ``--quick`` smoke run of one group."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.geometry import find_mic

from ase_bptt.data.db import TrajectoryDB

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "generalisation.py"
#: The quick run takes about 45 s on an idle 2-core machine; the limit leaves room for load.
QUICK_LIMIT_S = 240
#: The evaluation report and studies/weight_interpolation.py relax the same float32 structures through
#: different code (batch padding, summation order), so their Dq agree to float32 noise, not bitwise.
REPORT_RTOL = 1e-4


def _script(stem: str):
    """studies/<stem>.py imported as a module (registered, since dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(stem, SCRIPT.parent / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_example(stem: str, *args) -> None:
    """Run studies/<stem>.py with ``args`` on one thread; it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", f"studies.{stem}", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _example():
    sys.path.insert(0, str(SCRIPT.parent))
    return _script("generalisation")


def test_protocol_groups():
    ex = _example()
    assert [ex.kind_of(lab) for lab in ("vacancy", "sub:Ni", "int:Pd", "sub:Al+vacancy", "sub:Ni+sub:Au")] == [
        "vacancy",
        "sub",
        "int",
        "sub+vacancy",
        "sub+sub",
    ]
    labels = {"vacancy", "divacancy", "sub:Ni", "sub:Au", "int:Pd", "sub:Ni+vacancy", "sub:Ni+sub:Au"}
    loko = ex.hold_outs("loko", labels)
    assert list(loko) == ["vacancy", "divacancy", "sub", "int", "sub+vacancy", "sub+sub"]
    assert loko["sub"].values == ("sub:Au", "sub:Ni") and loko["sub+sub"].values == ("sub:Ni+sub:Au",)
    loeo = ex.hold_outs("loeo", labels)
    assert list(loeo) == ["Ni", "Pd", "Ag", "Pt", "Au", "Al"] and loeo["Pd"].kind == "element"
    assert ex.hold_outs("random", labels) == {"random": None}


def test_adapt_mi_settings_are_settings():
    """``--model adapt-mi`` replaces fields of Settings (a typo would fail here, not an hour into a run)."""
    ex = _example()
    s = ex.model_options(ex.FULL, "adapt-mi", False, ex.ADAPT_MI, 10.0)
    assert s.model["model_name"] == "adapt-mi" and s.pretrain_steps == 3000 and s.bptt_steps == 150
    assert s.finetune["eval_every"] == 15 and s.finetune["force_weight"] == 10.0 and s.n_train == ex.FULL.n_train
    # --quick keeps its tiny sizes and only switches the model; --model adapt (the default) changes nothing.
    q = ex.model_options(ex.QUICK, "adapt-mi", True, ex.ADAPT_MI, None)
    assert q.model == {**ex.QUICK.model, "model_name": "adapt-mi"} and q.pretrain_steps == ex.QUICK.pretrain_steps
    assert ex.model_options(ex.FULL, "adapt", False, ex.ADAPT_MI, None) == ex.FULL


def test_step_fire_and_proximal_reach_the_bptt_config():
    """``--step fire --proximal 0.1 --energy-weight 30`` build a valid FinetuneConfig: FIRE, no eta, tol 1e-5,
    the proximal and energy terms; without them the group tunes the fixed step from the val-chosen eta."""
    ex = _example()
    s = ex.model_options(ex.FULL, "adapt-mi", False, ex.ADAPT_MI, 10.0, "fire", 0.1, 30.0)
    cfg = ex.bptt_config(s, eta_bptt=0.05)
    assert (cfg.step, cfg.eta, cfg.tol, cfg.proximal, cfg.force_weight) == ("fire", None, 1e-5, 0.1, 10.0)
    assert cfg.energy_weight == 30.0
    assert cfg.max_batches == ex.ADAPT_MI["bptt_steps"]
    fixed = ex.bptt_config(ex.model_options(ex.FULL, "adapt-mi", False, ex.ADAPT_MI, None), eta_bptt=0.05)
    assert (fixed.step, fixed.eta, fixed.proximal, fixed.energy_weight) == ("fixed", 0.05, 0.0, 0.0)


def test_quick_run_holds_the_element_out(tmp_path):
    out = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        f"studies.{SCRIPT.stem}",
        "--quick",
        "--protocol",
        "loeo",
        "--groups",
        "Pd",
        "--threads",
        "1",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*args, "--out", str(out)], capture_output=True, text=True, timeout=QUICK_LIMIT_S, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"quick run: {time.perf_counter() - t0:.0f} s")
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "loeo" and list(results["groups"]) == ["Pd"]
    g = results["groups"]["Pd"]
    db = TrajectoryDB(out / "Pd" / "fcc.db", create=False)
    info = db.split_info()
    with_pd = {t for t, (_, _, el) in info.items() if "Pd" in el}
    # test is exactly the Pd structures, train and val have none, train is --n-train (8 in quick)
    assert with_pd and {t for t, (_, s, _) in info.items() if s == "test"} == with_pd
    assert g["n"] == len(with_pd) == g["splits"]["test"] and g["splits"]["train"] == 8
    assert db.metadata["splits"]["hold_out"] == [{"kind": "element", "values": ["Pd"]}]
    for key in ("bptt_over_fixed", "bptt_over_fire"):
        assert math.isfinite(g[key]) and g[key] > 0
    assert g["bptt_over_fixed"] == g["dq"]["bptt"] / g["dq"]["fixed"]
    report = json.loads((out / "Pd" / "eval" / "report.json").read_text())
    assert report["per_element"]["counts"]["Pd"] == g["n"]  # every test structure holds Pd
    summary = (out / "summary.md").read_text()
    assert "| Pd | element Pd |" in summary and "BPTT / ASE FIRE" in summary
    # Per kind: label means weighted by their counts, recomputed here from the evaluation report.
    fixed = next(c for c in report["checkpoints"] if c["name"] == "pretrained")["fixed_step_selected"]["dq"]
    tuned = next(c for c in report["checkpoints"] if c["name"] == "BPTT")["own_rule"]["dq"]
    for kind, k in g["per_kind"].items():
        labels = [lab for lab in report["label_counts"] if ex_kind(lab) == kind]
        n = sum(report["label_counts"][lab] for lab in labels)
        want = sum(tuned["per_label"][lab]["mean"] * report["label_counts"][lab] for lab in labels) / n
        base = sum(fixed["per_label"][lab]["mean"] * report["label_counts"][lab] for lab in labels) / n
        assert k["n"] == n and math.isclose(k["bptt"], want, rel_tol=1e-12), kind
        assert math.isclose(k["fixed"], base, rel_tol=1e-12), kind
        assert math.isclose(k["ratio"], k["bptt"] / k["fixed"], rel_tol=1e-12)
    assert sum(k["n"] for k in g["per_kind"].values()) == g["n"]
    assert g["force_mae"]["ratio"] > 0 and "force MAE tuned / pretrained" in summary
    # --summary-only rewrites the summary from the saved evaluation without evaluating again.
    stamp = (out / "Pd" / "eval" / "report.json").stat().st_mtime_ns
    (out / "summary.md").unlink()
    proc = subprocess.run([*args, "--out", str(out), "--summary-only"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.md").read_text() == summary
    # ... and without results.json (a run stopped before its end): the groups are found by their folders.
    (out / "results.json").unlink()
    proc = subprocess.run([*args, "--out", str(out), "--summary-only"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.md").read_text() == summary
    assert json.loads((out / "results.json").read_text())["groups"]["Pd"]["splits"] == g["splits"]
    assert (out / "Pd" / "eval" / "report.json").stat().st_mtime_ns == stamp
    # studies/weight_interpolation.py on the same group: its two ends are the report's two rows (the
    # evaluation's own code path).
    _run_example("weight_interpolation", out / "Pd", "--alphas", "0,0.5,1", "--fmax", "0.05", "--tight-reference")
    interpolation = json.loads((out / "Pd" / "interpolation.json").read_text())
    rows = {(r["alpha"], r["rule"]): r for r in interpolation["rows"]}
    assert interpolation["baseline"]["eta"] == report["checkpoints"][0]["fixed_step_selected"]["eta"]
    own, at_fixed, at_fmax = "own rule", f"fixed step {interpolation['baseline']['eta']:g}", "own rule to fmax 0.05"
    assert set(rows) == {(a, r) for a in (0.0, 0.5, 1.0) for r in (own, at_fixed, at_fmax)}
    assert rows[0.0, at_fixed]["test"] == pytest.approx(fixed["mean"], rel=REPORT_RTOL)
    assert rows[1.0, own]["test"] == pytest.approx(tuned["mean"], rel=REPORT_RTOL)
    for lab, v in rows[1.0, own]["test_per_label"].items():
        assert v == pytest.approx(tuned["per_label"][lab]["mean"], rel=REPORT_RTOL), lab
    # The recipe's references stop at fmax 0.01 eV/A: EMT's own minimum lies near them, not on them.
    assert 0 < interpolation["tight_reference"]["stored_vs_tight"] < 1
    assert all(math.isfinite(r["test_vs_tight_reference"]) and 0 <= r["test_converged"] <= 1 for r in rows.values())
    # studies/applicability_gate.py on the same group: gated Dq recomputed from its excursions and the
    # report's per-structure rows; val's largest excursion flags no val structure.
    _run_example("applicability_gate", out / "Pd")
    gate = json.loads((out / "Pd" / "applicability_gate.json").read_text())
    base = next(c for c in report["checkpoints"] if c["name"] == "pretrained")["fixed_step_selected"]["per_structure"]
    own_dq = next(c for c in report["checkpoints"] if c["name"] == "BPTT")["own_rule"]["per_structure"]
    assert gate["tuned_over_baseline"] == pytest.approx(tuned["mean"] / fixed["mean"], rel=1e-12)
    excursions = list(gate["test_excursions"].values())
    assert len(excursions) == g["n"] and all(x >= 0 for x in excursions)
    for name, threshold in (("any excursion", 0.0), ("beyond val's largest", max(gate["val_excursions"]))):
        entry = gate["gates"][name]
        gated = [b if x > threshold else t for x, b, t in zip(excursions, base, own_dq)]
        assert entry["threshold"] == threshold and entry["test_flagged"] == sum(x > threshold for x in excursions)
        assert entry["test_over_baseline"] == pytest.approx(sum(gated) / sum(base), rel=1e-12)
    assert gate["gates"]["beyond val's largest"]["val_flagged"] == 0


def ex_kind(label: str) -> str:
    """The example's kind_of, written again independently: drop every ':Element'."""
    return "+".join(part.split(":")[0] for part in label.split("+"))


def test_shell_displacements_hand_computed():
    """studies/defect_shells.py: radial moves count in their shell, tangential ones do not, across the
    periodic boundary too; an empty shell is NaN."""
    shells = _script("defect_shells")
    from ase import Atoms

    # Ni at the origin of a 10 A cube; neighbours at +x (2.5 A), at -y through the boundary (y = 7.5), and
    # one at 4.33 A (second shell).
    initial = Atoms("NiCu3", positions=[(0, 0, 0), (2.5, 0, 0), (0, 7.5, 0), (2.5, 2.5, 2.5)], cell=[10] * 3, pbc=True)
    final = initial.copy()
    final.positions[1] += (0.1, 0.3, 0)  # 0.1 A outward, 0.3 A tangential
    final.positions[2] += (0, -0.05, 0)  # -y is outward for the image at y = -2.5: +0.05 A
    final.positions[3] -= (0.03, 0.03, 0.03)  # inward by 0.03 * sqrt(3) A
    assert shells.interstitial_index(initial, "int:Ni") == 0
    centre = shells.defect_centre(initial, "int:Ni")
    first, second, empty = shells.shell_displacements(initial, final, centre, [2.9, 5.0, 6.0])
    assert first == pytest.approx(0.075, abs=1e-12)
    assert second == pytest.approx(-0.03 * np.sqrt(3), abs=1e-12)
    assert np.isnan(empty)


def test_defect_centre_of_vacancies_and_substitutions():
    """The centre of a vacancy is its empty site, of a divacancy across the boundary the midpoint of the
    two sites by minimum image, of a substitution + vacancy the midpoint of the substituent and the hole."""
    shells = _script("defect_shells")
    from ase.build import bulk

    a = 3.6
    perfect = bulk("Cu", "fcc", a=a, cubic=True) * (3, 3, 3)
    cell = perfect.cell.array
    # Site 0 is at the origin; its nearest neighbour through the boundary is at (-a/2, -a/2, 0).
    wrapped = [i for i, p in enumerate(perfect.positions) if np.allclose(p, (2.5 * a, 2.5 * a, 0))][0]
    vacancy = perfect.copy()
    del vacancy[[0]]
    assert shells.defect_centre(vacancy, "vacancy") == pytest.approx(np.zeros(3), abs=1e-9)
    divacancy = perfect.copy()
    del divacancy[[0, wrapped]]
    centre = shells.defect_centre(divacancy, "divacancy")
    expected = np.array([-a / 4, -a / 4, 0.0])  # the midpoint, either image of it
    assert np.linalg.norm(find_mic(centre - expected, cell, True)[0]) == pytest.approx(0.0, abs=1e-9)
    pair = perfect.copy()
    pair.numbers[1] = 79  # Au at (0, a/2, a/2) beside the vacancy at site 0
    del pair[[0]]
    assert shells.defect_centre(pair, "sub:Au+vacancy") == pytest.approx([0, a / 4, a / 4], abs=1e-9)
    with pytest.raises(ValueError, match="no empty site"):
        shells.defect_centre(perfect, "vacancy")


def test_weight_interpolation_hand_computed():
    """studies/weight_interpolation.py: pretrained + alpha (tuned - pretrained) per float tensor, the tuned
    model's integer buffers kept."""
    module = _script("weight_interpolation")
    import torch

    pre = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)}
    tuned = {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(5)}
    half = module.interpolate(pre, tuned, 0.5)
    assert half["w"].tolist() == [2.0, 0.0] and half["n"].item() == 5
    assert module.interpolate(pre, tuned, 0.0)["w"].tolist() == [1.0, -2.0]
    assert module.interpolate(pre, tuned, 1.25)["w"].tolist() == [3.5, 3.0]


def test_weight_interpolation_bad_input_is_one_line(tmp_path, capsys):
    """A folder that is not a group, unparsable --alphas and a non-positive --fmax: one error line each,
    before anything is loaded, and nothing written."""
    module = _script("weight_interpolation")
    for argv, needle in (
        ([str(tmp_path)], "lacks pretrained.pt, bptt.pt, fcc.db, eval/report.json"),
        ([str(tmp_path), "--alphas", "0,half"], "--alphas '0,half': give comma-separated numbers"),
        ([str(tmp_path), "--fmax", "0"], "every --fmax a positive number"),
    ):
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_applicability_gate_excursion_hand_computed():
    """studies/applicability_gate.py: the largest distance outside the box, per descriptor in its scale."""
    module = _script("applicability_gate")
    import torch

    low, high, scale = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 2.0])
    inside = torch.tensor([[0.0, 1.0], [0.5, -1.0]])
    assert module.excursion(inside, low, high, scale) == 0.0
    # row 1: 0.3 above high in column 0 (0.6 scales); row 2: 3 below low in column 1 (1.5 scales)
    outside = torch.tensor([[1.3, 0.0], [0.5, -4.0]])
    assert module.excursion(outside, low, high, scale) == pytest.approx(1.5)
    assert module.excursion(torch.empty(0, 2), low, high, scale) == 0.0


def test_applicability_gate_bad_input_is_one_line(tmp_path, capsys):
    """A folder that is not a group: one error line naming what it lacks, nothing written."""
    module = _script("applicability_gate")
    with pytest.raises(SystemExit) as e:
        module.main([str(tmp_path)])
    assert e.value.code == 2
    assert "lacks fcc.db, eval/report.json" in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_generalisation_freeze_is_checked_before_anything_is_made(tmp_path, capsys):
    """``--freeze`` with a prefix the model lacks: one line naming the model's groups; no pool, no folder."""
    ex = _example()
    out = tmp_path / "gen"
    with pytest.raises(SystemExit) as e:
        ex.main(["--model", "adapt-mi", "--freeze", "embedx", "--out", str(out)])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--freeze: freeze: 'embedx' names no parameter" in line and "pair_out" in line
    assert not out.exists()

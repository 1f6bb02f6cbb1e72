"""Measure periodic vs cartesian coordinate features on Stillinger-Weber silicon frames.

Run: .venv/bin/python -m studies.measure_coordinate_features [STEPS]   (about 2-4 minutes on 1 thread)
"""

import sys
import time

import numpy as np
import torch
from ase.build import bulk
from ase.optimize import FIRE
from matscipy.calculators.manybody import Manybody
from matscipy.calculators.manybody.explicit_forms import StillingerWeber
from matscipy.calculators.manybody.explicit_forms.stillinger_weber import Stillinger_Weber_PRB_31_5262_Si

from ase_bptt.batch import Batch
from ase_bptt.models.adapt import ADAPT, ADAPTConfig

torch.set_num_threads(1)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 600


def relaxation(seed):
    rng = np.random.default_rng(seed)
    atoms = bulk("Si", "diamond", a=5.431, cubic=True) * (2, 2, 2)
    del atoms[int(rng.integers(len(atoms)))]
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    atoms.calc = Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))
    frames = []

    def grab():
        frames.append((atoms.positions.copy(), atoms.get_forces().copy(), atoms.get_potential_energy()))

    opt = FIRE(atoms, logfile=None)
    opt.attach(grab, interval=1)
    opt.run(fmax=0.01, steps=200)
    template = atoms.copy()
    out = []
    for p, f, e in frames:
        a = template.copy()
        a.positions = p
        out.append((a, f, e))
    return out


def sample(seeds, per):
    frames = []
    for s in seeds:
        fr = relaxation(s)
        idx = np.linspace(0, len(fr) - 1, per).round().astype(int)
        frames += [fr[i] for i in idx]
    batch = Batch.from_atoms([a for a, _, _ in frames], dtype=torch.float32)
    forces = torch.tensor(np.stack([f for _, f, _ in frames]), dtype=torch.float32)
    energy = torch.tensor([e for _, _, e in frames], dtype=torch.float32)
    return batch, forces, energy


t0 = time.time()
train = sample(range(0, 24), 10)  # 240 frames from 24 relaxations
val = sample(range(100, 106), 10)  # 60 frames from 6 other relaxations
print(f"data {time.time() - t0:.0f}s; val zero-predictor MAE {val[1].abs().mean():.4f} eV/A", flush=True)

for coords in ("cartesian", "periodic"):
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(coordinates=coords))
    model.fit_standardisation(*train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for _ in range(STEPS):
        idx = torch.randint(len(train[0]), (16,), generator=g)
        b = train[0].select(idx)
        out = model(b)
        loss = ((out.forces - train[1][idx]) / model.force_scale).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(val[0]).forces
        mae = (pred - val[1]).abs().mean().item()
        tr = model(train[0].select(range(60))).forces
        tr_mae = (tr - train[1][:60]).abs().mean().item()
    print(
        f"{coords:9s}: val force MAE {mae:.4f} eV/A (train {tr_mae:.4f}) after {STEPS} steps, {time.time() - t0:.0f}s",
        flush=True,
    )

"""Shared harness for the ase-bptt benchmarks: timing, medians, peak memory, JSON.

Every figure a benchmark reports is a ratio against a baseline measured in the
same run and a median over repeats, so a noisy shared machine still gives a
stable number. Peak memory is measured in a fresh subprocess per configuration
(the parent re-runs the same script with ``--worker SPEC``), because a process's
allocator and high-water mark remember earlier configurations.

Peak memory:
    * CPU: resident set size. Freed heap is first handed back to the OS
      (glibc ``malloc_trim``), then the high-water mark is reset
      (``/proc/self/clear_refs`` <- 5), so the high-water mark after the call
      (``VmHWM``, the figure ``getrusage(RUSAGE_SELF).ru_maxrss`` reports in a
      process that was not forked from a bigger one) minus the resident size
      before it is the call's own peak. Where /proc is missing: the plain
      ru_maxrss delta (which under-reads if an earlier phase peaked higher).
    * CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated
      before the call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "RESULTS_DIR",
    "make_parser",
    "resolve_device",
    "synchronize",
    "time_call",
    "summarize",
    "peak_memory_mib",
    "run_worker",
    "run_workers",
    "worker_entry",
    "environment",
    "write_json",
    "print_table",
    "silicon_cell",
    "silicon_defect_cells",
    "fit_exponent",
    "finish_args",
    "torch_dtype",
    "build_model",
    "n_parameters",
    "interleaved_times",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_WORKER_MARK = "@@BENCH-RESULT@@"


# ---------------------------------------------------------------- arguments
def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares.

    Args:
        name: the script's short name; the default output is
            ``benchmarks/results/<name>.json``.
        description: one line for ``--help``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and 1-2 repeats: checks the harness, not speed"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per figure; the median is reported (default: 5, quick: 2)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="model and tensor dtype (default: float32, the package default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON output path")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on --quick, set threads, check the device."""
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))
    return args


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (only the two float dtypes are allowed)."""
    return {"float32": torch.float32, "float64": torch.float64}[name]


def build_model(
    *,
    quick: bool,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    name: str = "adapt",
):
    """An untrained ADAPT (``name="adapt-mi"``: ADAPT-MI) in eval mode: the default config, or a tiny one
    for --quick.

    Untrained weights cost the same time as trained ones; the benchmarks time
    work, not accuracy.
    """
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig
    from ase_bptt.models.mi_attention import MinImageADAPT, MinImageADAPTConfig

    torch.manual_seed(seed)
    tiny = {"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2}
    if name == "adapt-mi":
        model = MinImageADAPT(MinImageADAPTConfig(**(tiny if quick else {})))
    else:
        model = ADAPT(ADAPTConfig(**tiny) if quick else ADAPTConfig())
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def n_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, with a clear exit if CUDA was asked for but is absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return dev


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels so wall-clock times are honest on GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------- timing
def time_call(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and all samples (seconds)."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "samples_s": list(times),
    }


def interleaved_times(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Time several callables round-robin, so slow drifts of a shared machine hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[key].append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next peak is measured from live memory.

    Without it a process keeps the memory an earlier call freed, a later call
    reuses it, and the resident high-water mark does not move.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_memory_mib(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Peak memory of one call of ``fn`` above what was in use just before it.

    Run it in a fresh process (see :func:`run_worker`) for honest numbers.

    Returns:
        ``{"peak_mib": float, "method": str}``.
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        return {"peak_mib": peak / 2**20, "method": "torch.cuda.max_memory_allocated delta"}
    _release_free_heap()
    if _reset_high_water_mark() and _status_kib("VmHWM") is not None:
        # VmHWM, not ru_maxrss: a child's ru_maxrss also carries the parent's
        # resident size at fork (Linux records the old mm's high-water mark at
        # exec), so in a worker started by a 450 MiB parent it never drops below that.
        before = _status_kib("VmRSS")
        fn()
        after = _status_kib("VmHWM")
        method = "VmHWM after call - VmRSS before (high-water mark reset via /proc/self/clear_refs, freed heap trimmed)"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        method = "ru_maxrss delta"
    return {
        "peak_mib": max(after - before, 0) / 1024,
        "method": method,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": after / 1024,
    }


# --------------------------------------------------------------- subprocess
def run_worker(script: str | Path, spec: dict[str, Any], *, timeout: float = 1200) -> dict[str, Any]:
    """Run ``script --worker JSON(spec)`` in a fresh interpreter and return its result dict."""
    return run_workers(script, [spec], parallel=1, timeout=timeout)[0]


def run_workers(
    script: str | Path, specs: Sequence[dict[str, Any]], *, parallel: int = 1, timeout: float = 1200
) -> list[dict[str, Any]]:
    """Run one fresh interpreter per spec, ``parallel`` at a time; results in the order of ``specs``.

    Running several at once is fine for memory figures (each process has its
    own resident set) and saves the interpreter start-up (~2-6 s of importing
    torch and ase each) in --quick runs; do not time things this way.
    """
    results: list[dict[str, Any] | None] = [None] * len(specs)
    pending = list(enumerate(specs))
    running: list[tuple[int, list[str], subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            i, spec = pending.pop(0)
            cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
            running.append((i, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        i, cmd, proc = running.pop(0)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in reversed(out.splitlines()):
            if line.startswith(_WORKER_MARK):
                results[i] = json.loads(line[len(_WORKER_MARK) :])
                break
        else:
            for _, _, other in running:
                other.kill()
            raise RuntimeError(
                f"benchmark worker {Path(cmd[1]).name} --worker {cmd[3]} failed (exit {proc.returncode}):\n{err[-4000:]}"
            )
    return results  # type: ignore[return-value]


def worker_entry(spec_json: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The child side of :func:`run_worker`: run ``fn(spec)`` and print its JSON."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = fn(spec)
    print(_WORKER_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------- reporting
def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Machine, versions and the options used, for the JSON header."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = torch.device(args.device)
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "quick": bool(args.quick),
        "repeats": int(args.repeats),
        "dtype": getattr(args, "dtype", None),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder, and say where (every benchmark's last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Print and return a plain-text table.

    Args:
        rows: one dict per row.
        columns: ``(key, header, format)`` triples, e.g. ``("ratio", "ratio", "{:.2f}")``.
    """
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------ inputs
def silicon_cell(n_sites: int, *, a: float = 5.43):
    """Diamond silicon supercell with about ``n_sites`` sites (8 * r^3 conventional, or r^3 primitive)."""
    from ase.build import bulk

    for r in range(1, 20):
        if 8 * r**3 == n_sites:
            return bulk("Si", "diamond", a=a, cubic=True) * (r, r, r)
        if 2 * r**3 == n_sites:
            return bulk("Si", "diamond", a=a) * (r, r, r)
    # Not a cube count (e.g. 1000): build the smallest orthorhombic supercell at least that big, then trim.
    base = bulk("Si", "diamond", a=a, cubic=True)
    r = 1
    while 8 * r**3 < n_sites:
        r += 1
    atoms = base * (r, r, r)
    del atoms[list(range(n_sites, len(atoms)))]
    return atoms


def silicon_defect_cells(n: int, *, repeat: int = 2, rattle: float = 0.1, seed: int = 0) -> list:
    """``n`` rattled silicon point-defect cells on a ``repeat^3`` conventional supercell.

    Cycles through a vacancy, a tetrahedral interstitial, a carbon and a
    germanium substitution (the 64-site cell gives 63 to 65 atoms), each with
    its own random rattle so every structure relaxes differently.
    """
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    a = 5.43
    out = []
    for i in range(n):
        atoms = bulk("Si", "diamond", a=a, cubic=True) * (repeat, repeat, repeat)
        kind = i % 4
        if kind == 0:
            del atoms[0]
        elif kind == 1:
            atoms.append("Si")
            atoms.positions[-1] = [a / 2, a / 2, a / 2]  # tetrahedral site of the first cube
        elif kind == 2:
            atoms.numbers[0] = 6
        else:
            atoms.numbers[0] = 32
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.info["defect"] = ("vacancy", "interstitial", "C_Si", "Ge_Si")[kind]
        out.append(atoms)
    return out


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(size)."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.asarray(times, dtype=float))
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)

"""Portability of the numeric bars: how far each bar's quantity moves across kernel paths, threads and seeds.

Another CPU takes other ATen, oneDNN and MKL kernels, and other thread counts sum in another order;
optimisers amplify those last-bit differences. This runs the tests marked ``numeric`` under forced
kernel paths (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``) at 1 and 2
threads and with several attack-seed sets (``GRADINV_BAR_SEED``), collects every bar check through
``GRADINV_BAR_LOG``, and prints per bar its threshold and the min/median/max seen, for the attacks and
for their disabled controls. Run it before you set or change a bar.

    .venv/bin/python benchmarks/portability.py [--seeds 3] [--threads 1 2] [--full] [--native]
        [--settings avx2/AVX2 ...] [--log-dir DIR] [TEST PATHS]
    make portability

With ``--log-dir`` the JSON lines stay, one file per setting, thread count and seed set, and the
table covers every file there: run the settings one at a time into one directory, if you like.

By default the three kernel families are forced together, from the oldest path to the newest
(``default``/SSE4.1, AVX2, AVX-512 where the CPU has ``avx512f``); ``--full`` runs the full product of
ATen and oneDNN settings, ``--native`` adds the unforced run that ``make test`` takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from arguments import positive  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
ATEN = ("default", "avx2", "avx512")
ONEDNN = ("SSE41", "AVX2", "AVX512_CORE")
MKL = {"default": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}  # MKL paired with ATen
PROBE = """
import torch
print(torch.backends.cpu.get_cpu_capability())
torch.nn.functional.conv2d(torch.randn(2, 16, 32, 32), torch.randn(16, 16, 3, 3))  # large enough for oneDNN
"""


@dataclass(frozen=True)
class Setting:
    name: str
    env: dict


def has_avx512() -> bool:
    try:
        return any(
            "avx512f" in line.split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except OSError:
        return False


def kernel_settings(full: bool, native: bool) -> list[Setting]:
    aten = ATEN if has_avx512() else ATEN[:2]
    onednn = ONEDNN if has_avx512() else ONEDNN[:2]
    pairs = itertools.product(aten, onednn) if full else zip(aten, onednn)
    settings = [Setting("native", {})] if native else []
    for capability, isa in pairs:
        env = {"ATEN_CPU_CAPABILITY": capability, "ONEDNN_MAX_CPU_ISA": isa}
        if not full:
            env["MKL_ENABLE_INSTRUCTIONS"] = MKL[capability]
        settings.append(Setting(f"{capability}/{isa}", env))
    return settings


def thread_env(threads: int) -> dict:
    # Passive waiting changes no result, but spares a busy machine the spinning of idle OpenMP threads.
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def probe(setting: Setting) -> str:
    """What the setting gives this CPU: ATen's capability and oneDNN's ISA, as the libraries report them."""
    env = {**os.environ, **setting.env, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if "isa:" in line), "?")
    capability = next((line for line in lines if line and not line.startswith("onednn_verbose")), "?")
    return f"ATen {capability}, oneDNN {isa}"


def run_tests(setting: Setting, threads: int, seed: int, log: Path, tests: list[str]) -> tuple[int, list[str], float]:
    """The numeric tests under one setting; their exit code, the failed tests and the seconds taken."""
    env = {
        **os.environ,
        **setting.env,
        **thread_env(threads),
        "GRADINV_BAR_LOG": str(log),
        "GRADINV_BAR_SEED": str(seed),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "numeric",
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-rf",
        "--tb=no",
        *tests,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return done.returncode, failed, time.perf_counter() - start


def read_logs(directory: Path) -> list[dict]:
    return [json.loads(line) for log in sorted(directory.glob("*.jsonl")) for line in log.read_text().splitlines()]


def spread_table(records: list[dict]) -> str:
    """Per bar and side (attack or disabled control): threshold, count, min/median/max, misses."""
    rows = ["| bar | threshold | run | n | min | median | max | missed |", "|---|---|---|---|---|---|---|---|"]
    keyed: dict[tuple, list[dict]] = {}
    for record in records:
        keyed.setdefault((record["bar"], record["holds"]), []).append(record)
    for (bar, holds), group in sorted(keyed.items(), key=lambda item: (item[0][0], not item[0][1])):
        values = [r["value"] for r in group]
        missed = sum(r["missed"] for r in group)
        threshold = f"{group[0]['direction']} {group[0]['threshold']:g}"
        side = "attack" if holds else "control"
        rows.append(
            f"| {bar.replace('|', '&#124;')} | {threshold} | {side} | {len(values)} | {min(values):.4g} | "
            f"{statistics.median(values):.4g} | {max(values):.4g} | {missed} |"
        )
    return "\n".join(rows)


def missed(record: dict) -> bool:
    """Whether a check went the wrong way: an attack short of its bar, or a control that cleared it."""
    value, threshold = record["value"], record["threshold"]
    cleared = value >= threshold if record["direction"] == ">=" else value < threshold
    return cleared != record["holds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive, default=3, help="attack-seed sets per setting (default 3)")
    parser.add_argument("--threads", type=positive, nargs="+", default=[1, 2])
    parser.add_argument("--full", action="store_true", help="every ATen x oneDNN pair, not the three matched ones")
    parser.add_argument("--native", action="store_true", help="also the unforced kernels that `make test` takes")
    parser.add_argument("--settings", nargs="+", metavar="NAME", help="only these settings (e.g. avx2/AVX2, native)")
    parser.add_argument("--log-dir", type=Path, help="keep the JSON lines here; the table covers all files there")
    parser.add_argument("tests", nargs="*", default=["tests"], help="test paths (default: tests)")
    args = parser.parse_args()
    settings = kernel_settings(args.full, args.native or "native" in (args.settings or []))
    if args.settings:
        unknown = sorted(set(args.settings) - {s.name for s in settings})
        if unknown:
            parser.error(
                f"--settings: {' '.join(unknown)} is not valid here; choose from {', '.join(s.name for s in settings)}"
            )
        settings = [s for s in settings if s.name in args.settings]
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failures = []
    with nullcontext(args.log_dir) if args.log_dir else tempfile.TemporaryDirectory(prefix="portability-") as logs:
        for setting in settings:
            print(f"{setting.name}: {probe(setting)}", flush=True)
            for threads, seed in itertools.product(args.threads, range(args.seeds)):
                log = Path(logs) / f"{setting.name.replace('/', '_')}-{threads}t-seed{seed}.jsonl"
                log.unlink(missing_ok=True)
                code, failed, seconds = run_tests(setting, threads, seed, log, args.tests)
                checks = len(log.read_text().splitlines()) if log.exists() else 0
                where = f"{setting.name}, {threads} thread(s), seed set {seed}"
                status = "passed" if code == 0 else f"exit {code}, failed: {' '.join(failed) or '(see pytest)'}"
                print(f"  {where}: {checks} checks in {seconds:.0f} s, {status}", flush=True)
                failures.extend(f"{where}: {name}" for name in failed)
                if code not in (0, 1):  # 1: tests failed; anything else: pytest could not run them
                    failures.append(f"{where}: pytest exit {code}")
        records = [dict(record, missed=missed(record)) for record in read_logs(Path(logs))]
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(settings)} kernel settings x threads {args.threads} x {args.seeds} seed sets, {minutes:.1f} min\n")
    print(spread_table(records))
    print("\n" + ("\n".join(["failed:", *failures]) if failures else "every numeric test passed under every setting"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling: near-empty trials on a real multi-node Ray cluster of this machine (1 and 2 worker nodes).

The same near-empty trials as runner_overhead.py (the analytic attack on a 4x4 image, about a
millisecond of work) go through `gradinv run --address` to a head plus 1 or 2 `ray start` worker
nodes. If two nodes do not finish faster than one, the driver (or this machine's 2 cores) is the
limit, not the workers. Also measured: the size of a row and how fast the results directory takes
rows, the two other costs of a large study.

    .venv/bin/python benchmarks/scaling.py [--trials 600] [--workers 1 2]

The clusters' temporary files (Ray's sessions and sockets) go under $RAY_TMPDIR, else /tmp.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support: the multi-node cluster of the tests
from arguments import positive  # noqa: E402
from runner_overhead import write_study  # noqa: E402

from sweep.study import load_study  # noqa: E402
from tests.support.local_cluster import LocalCluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_on_cluster(workers: int, study: Path, temp: Path, trials: int) -> tuple[float, int]:
    cluster = LocalCluster(temp / f"c{workers}")
    cluster.temp_dir.mkdir()
    try:
        cluster.start_head()
        for index in range(workers):
            cluster.add_worker(f"node_{index}", num_cpus=1)
        results = temp / f"results-{workers}"
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sweep",
                "run",
                str(study),
                "--results",
                str(results),
                "--address",
                cluster.address,
                "--no-progress",
                "--batch-rows",
                "256",
            ],
            cwd=REPO,
            env=cluster.env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-2000:])
        import pyarrow.parquet as pq

        rows = pq.read_table(results).num_rows
        if rows != trials:
            raise RuntimeError(f"{rows} rows for {trials} trials: the results should hold one row per trial")
        return seconds, rows
    finally:
        cluster.stop()


def row_costs(results: Path) -> tuple[float, float]:
    """Bytes per row on disk, and rows per second written by the results directory."""
    import pyarrow.parquet as pq

    from gradinv.results.store import ResultsDir

    rows = pq.read_table(results).to_pylist()
    size = sum(f.stat().st_size for f in results.glob("*.parquet")) / len(rows)
    target = results.parent / "rewrite"
    with ResultsDir(target) as sink:
        start = time.perf_counter()
        for offset in range(0, len(rows), 256):
            sink.write([{**row, "key": f"{row['key']}-{offset}"} for row in rows[offset : offset + 256]])
        seconds = time.perf_counter() - start
    return size, len(rows) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=600)
    parser.add_argument("--workers", type=positive, nargs="+", default=[1, 2], help="worker nodes, one cluster each")
    args = parser.parse_args()
    args.workers = sorted(set(args.workers))
    # SIGTERM unwinds like Ctrl-C, so that each cluster's nodes (in their own process groups) are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # A short directory: Ray's socket paths are length-limited.
    with tempfile.TemporaryDirectory(prefix="gi-", dir=os.environ.get("RAY_TMPDIR", "/tmp")) as tmp:
        temp = Path(tmp)
        study = write_study(temp, args.trials)
        trials = len(load_study(study).trials)
        measured = {workers: run_on_cluster(workers, study, temp, trials) for workers in args.workers}
        size, write_rate = row_costs(temp / f"results-{args.workers[-1]}")
    print(f"{trials} near-empty trials through `gradinv run --address` (driver, head and nodes on 2 cores)\n")
    # One row per trial: a study's rows/s is its trials/s, so one column holds both.
    print(f"{'worker nodes':<14}{'seconds':>9}{'trials/s':>10}{'speed-up':>10}")
    first = measured[args.workers[0]]
    base = first[1] / first[0]
    for workers, (seconds, rows) in measured.items():
        print(f"{workers:<14}{seconds:>9.1f}{rows / seconds:>10.1f}{rows / seconds / base:>10.2f}")
    print(f"\nrow size on disk: {size / 1024:.1f} KiB (near-empty trials: two 4x4 PNGs)")
    print(f"results directory alone: {write_rate:.0f} rows/s in batches of 256 (one core)")
    print(f"(cores on this machine: {os.cpu_count()})")


if __name__ == "__main__":
    main()

"""Results in object storage: the same tiny study into a local directory and into S3 (moto's server on
127.0.0.1), in one process, interleaved, each run into a fresh location.

What differs is the results path alone: the lease (a read, a write, a read back, a heartbeat), each batch
staged and copied into place, the listing and footer reads when the results are opened. Prints one table;
absolute times drift on a shared machine, the ratio in one run holds.

    .venv/bin/python benchmarks/results_storage.py [--trials 56] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from arguments import positive  # benchmarks/ is on sys.path when a script runs

STUDY = """
name: storage
data: {{dataset: faces, images: {images}, image_size: 8}}
fixed: {{model: convnet, width: 2, iterations: 3}}
grid:
  fl: [fedsgd, fedavg]
resources: {{num_cpus: 1}}
"""
TARGET = 1.10


def timed_run(study, results) -> tuple[float, float]:
    """Seconds for the whole run, and seconds after Ray was up (its start is paid once per study)."""
    from sweep import runner

    real_connect, ready = runner.connect, {}

    def timed_connect(*args, **kwargs):
        handle = real_connect(*args, **kwargs)
        ready["at"] = time.perf_counter()
        return handle

    runner.connect = timed_connect
    try:
        start = time.perf_counter()
        code = runner.run_study(study, results, runner.RunOptions(progress=False))
        end = time.perf_counter()
    finally:
        runner.connect = real_connect
    assert code == 0, f"run into {results} ended with {code}"
    return end - start, end - ready["at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=56, help="an even number: two trials per image")
    parser.add_argument("--repeats", type=positive, default=3, help="runs of each, interleaved")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support.s3
    from gradinv.results.remote import open_store
    from sweep.study import load_study
    from tests.support.s3 import S3Server

    server = S3Server().start()
    try:
        os.environ.update(server.env)
        server.create_bucket("bench")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["GRADINV_JOURNALS"] = f"{tmp}/journals"
            path = Path(tmp) / "storage.yaml"
            path.write_text(STUDY.format(images=max(1, args.trials // 2)))
            study = load_study(path)
            times = {"local": [], "s3": []}
            for repeat in range(args.repeats):
                order = ("local", "s3") if repeat % 2 == 0 else ("s3", "local")  # neither always runs first
                for kind in order:
                    where = Path(tmp) / f"local-{repeat}" if kind == "local" else f"s3://bench/run-{repeat}"
                    times[kind].append(timed_run(study, where))
                    assert open_store(where).read(["key"]).num_rows == len(study.trials)
    finally:
        server.stop()
    print_table(len(study.trials), args.repeats, times)


def print_table(trials: int, repeats: int, times: dict) -> None:
    print(f"{trials} trials per run, {repeats} runs each, interleaved; medians\n")
    print(f"{'results':<28}{'seconds':>9}{'after Ray start':>17}")
    medians = {}
    for kind, name in (("local", "local directory"), ("s3", "s3:// (moto, 127.0.0.1)")):
        total = statistics.median(t for t, _ in times[kind])
        steady = statistics.median(s for _, s in times[kind])
        medians[kind] = (total, steady)
        print(f"{name:<28}{total:>9.2f}{steady:>17.2f}")
    for kind in ("local", "s3"):
        print(f"{'':<4}each {kind} run (s): " + ", ".join(f"{t:.2f}" for t, _ in times[kind]))
    ratio = medians["s3"][0] / medians["local"][0]
    steady = medians["s3"][1] / medians["local"][1]
    verdict = "met" if ratio <= TARGET else "not met"
    print(f"\nratio s3/local: {ratio:.3f} (after Ray start {steady:.3f}); target <= {TARGET:.2f}: {verdict}")


if __name__ == "__main__":
    main()

"""Runner overhead: near-empty trials through the full path (study -> Ray -> Parquet) versus a plain loop.

Each trial is the analytic attack on a 4x4 image and a tiny MLP (about a millisecond of work), so
what is measured is the runner: task submission, scheduling, result transfer, PNG encoding and
Parquet writing. Prints one table; absolute times drift on a shared machine, the ratio holds.

    .venv/bin/python benchmarks/runner_overhead.py [--trials 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv.data import dataset_spec

STUDY = """
name: overhead
data: {{dataset: faces, images: {images}, image_size: 4}}
fixed: {{model: mlp, width: 16, attack: analytic}}
grid:
  model_seed: {seeds}
resources: {{num_cpus: 1}}
lanes: {lanes}
"""


def write_study(directory: Path, trials: int, lanes: int = 1) -> Path:
    images = min(trials, dataset_spec("faces").test_images)
    seeds = list(range(-(-trials // images)))
    path = directory / f"overhead-{lanes}.yaml"
    path.write_text(STUDY.format(images=images, seeds=seeds, lanes=lanes))
    return path


def plain_loop(study) -> float:
    from gradinv.results.schema import trial_key
    from sweep.worker import Pack, run_pack

    start = time.perf_counter()
    for spec in study.trials:
        run_pack(Pack(study.name, (trial_key(spec),), (spec,)))
    return time.perf_counter() - start


def full_path(study, results: Path) -> tuple[float, float]:
    """Seconds for the whole run, and seconds after Ray was up (its start is paid once per study)."""
    import ray

    from sweep import runner

    real_connect = runner.connect
    ready = {}

    def timed_connect(*args, **kwargs):
        handle = real_connect(*args, **kwargs)
        ready["at"] = time.perf_counter()
        return handle

    runner.connect = timed_connect
    start = time.perf_counter()
    code = runner.run_study(study, results, runner.RunOptions(progress=False, flush_rows=256))
    end = time.perf_counter()
    runner.connect = real_connect
    assert code == 0 and not ray.is_initialized()
    return end - start, end - ready["at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=1000)
    parser.add_argument("--lanes", type=positive, default=1, help="trials packed per task (study field `lanes`)")
    args = parser.parse_args()
    import pyarrow.parquet as pq
    import torch

    from sweep.study import load_study

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        study = load_study(write_study(Path(tmp), args.trials, args.lanes))
        trials = len(study.trials)
        loop = plain_loop(study)
        total, steady = full_path(study, Path(tmp) / "results")
        rows = pq.read_table(Path(tmp) / "results").num_rows
    print(
        f"{trials} near-empty trials, {rows} rows written; lanes={args.lanes}; 2 tasks at once on Ray, "
        "1 trial at a time in the loop\n"
    )
    print(f"{'path':<38}{'seconds':>9}{'trials/s':>10}{'ms/trial':>10}")
    for name, seconds in (
        ("plain loop (run_pack, no Ray)", loop),
        ("full path incl. Ray start", total),
        ("full path after Ray start", steady),
    ):
        print(f"{name:<38}{seconds:>9.1f}{trials / seconds:>10.1f}{1000 * seconds / trials:>10.2f}")
    overhead = (steady - loop) / trials * 1000
    print(f"\nrunner overhead per trial, amortised (steady full path - plain loop): {overhead:.2f} ms")
    print(f"driver sustained: {trials / steady:.0f} trials/s, {rows / steady:.0f} rows/s")


if __name__ == "__main__":
    main()

"""Every script in benchmarks/ runs with its smallest arguments and prints its table, so that a refactor
cannot break one unseen. Each runs as `python benchmarks/X.py` in its own process group (a script that
starts Ray is stopped with everything it started), Ray's files under the test's private directory."""

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HELPERS = {"arguments.py"}  # imported by the scripts, not run

TINY_TUNE = """
name: tiny-tune
data: {dataset: faces, images: 2, image_size: 8}
fixed: {model: convnet, width: 2}
resources: {num_cpus: 1}
tune:
  budget: 16
  candidates: 3
  parallel: 1
  tuning_images: 1
  held_out_images: 1
  sampler: {name: random, seed: 3}
  pruner: {name: median, startup: 1}
  space:
    lr: [1.0e-4, 0.3]
"""


@dataclass(frozen=True)
class Smallest:
    """A script's smallest run: its arguments ({tmp}: the test's directory), a line its table prints
    exactly, a regular expression for the table's rows and how many rows it prints."""

    args: tuple[str, ...]
    header: str
    row: str
    rows: int


RUNS = {
    "attack_throughput.py": Smallest(
        (
            "--cases",
            "convnet64-4img-fedavg5,convnet32-28x28x1",
            "--repeats",
            "1",
            "--iterations",
            "1",
            "--max-lanes",
            "2",
            "--width",
            "2",
            "--threads",
            "1",
        ),
        "  configuration      trial-its/s  ratio to (a)          min..max",
        r"  \([abc]\) (plain loop|lanes=[12]) ",
        6,
    ),
    "bn_prior.py": Smallest(
        ("--iterations", "1", "--size", "8", "--batches", "1", "--weights", "0.01"),
        "| attack | batch 0 | mean | vs plain | seconds |",
        r"\| (plain|bn batch|bn running|best data-only guess)",
        4,
    ),
    "false_prunes.py": Smallest(
        ("{tmp}/tiny-tune.yaml",),
        "search                           candidate pruned at    final   median     best  verdict",
        r"tiny-tune +2 +\d/8 .*(rightly pruned|false prune|would have won)$",
        1,
    ),  # candidate 2 is pruned
    "fedavg_order.py": Smallest(
        (
            "--dataset",
            "faces",
            "--image-size",
            "8",
            "--width",
            "1",
            "--iterations",
            "1",
            "--victims",
            "0",
            "1",
            "--train-subset",
            "8",
            "--epochs",
            "2",
            "--local-lrs",
            "1e-2",
            "--clients",
            "1",
        ),
        "| victim | local lr | epochs | known order | unknown order | own per epoch (epoch_prior 0.01) "
        "| unknown − known | 1 − cos at the truth |",
        r"\| (untrained|trained 1 epochs) \| 0\.01 \| 2 \| [+-]\d+\.\d\d \(",
        2,
    ),
    "imprint_recovery.py": Smallest(
        ("--bins", "2", "--batches", "1", "--batch", "2", "--train-sample", "2", "--width", "1", "--fl", "fedavg"),
        "  bins  batch     images   alone  >=30 dB   median",
        r" +2 +(0 +0-1|mean) ",
        2,
    ),
    "label_methods.py": Smallest(
        ("--batches", "1", "--sizes", "2", "12", "--width", "1", "--epochs", "1", "--train-subset", "8"),
        "| victim | batch | method | mean accuracy (applicable) | not applicable | accuracy when run anyway |",
        r"\| (untrained|trained) \| (2|12) \| (bias_counts|ilrg|ilrg, paper only) \|",
        12,
    ),
    "lane_agreement.py": Smallest(
        ("--trials", "2", "--iterations", "1", "--width", "1", "--fl", "fedavg"),
        " trial    packed     alone       gap",
        r" +[01] +-?\d+\.\d\d +-?\d+\.\d\d +[+-]\d+\.\d\d$",
        2,
    ),
    "memory_estimate.py": Smallest(
        ("--cases", "tiny", "--iterations", "1"),
        "| case | lanes | estimate | measured peak RSS | ratio | trial's own: estimate | measured | ratio |",
        r"\| tiny \| 1 \| ",
        1,
    ),
    "portability.py": Smallest(
        (
            "tests/test_lanes.py::test_each_lane_matches_its_own_single_lane_computation[settings0]",
            "--seeds",
            "1",
            "--threads",
            "1",
            "--settings",
            "default/SSE41",
        ),
        "| bar | threshold | run | n | min | median | max | missed |",
        r"\| lanes: (objective|gradient), ",
        2,
    ),
    "reference_defaults.py": Smallest(
        ("--images", "2", "--iterations", "1", "--width", "1", "--lanes", "2"),
        " image  reference   former    diff",
        r" +[01] +-?\d+\.\d\d +-?\d+\.\d\d +[+-]\d+\.\d\d$",
        2,
    ),
    "results_storage.py": Smallest(
        ("--trials", "2", "--repeats", "1"),
        "results                       seconds  after Ray start",
        r"(local directory|s3:// \(moto, 127\.0\.0\.1\)) +\d+\.\d\d +\d+\.\d\d$",
        2,
    ),
    "runner_overhead.py": Smallest(
        ("--trials", "2"),
        "path                                    seconds  trials/s  ms/trial",
        r"(plain loop|full path) .* +\d+\.\d\d$",
        3,
    ),
    "scaling.py": Smallest(
        ("--trials", "2", "--workers", "1"),
        "worker nodes    seconds  trials/s  speed-up",
        r"1 +\d+\.\d +\d+\.\d +1\.00$",
        1,
    ),
    "time_to_leak.py": Smallest(
        ("--images", "2", "--victims", "0", "--at-most", "8", "--width", "2"),
        "| victim | recipe | time to leak (s) | iterations run | last median gain | seconds in all | now / before |",
        r"\| untrained \| (before|now) \| (never|\d+) \| 8 \| [+-]\d+\.\d\d \|",
        2,
    ),
}


def test_every_benchmark_script_has_a_smallest_run():
    scripts = {path.name for path in (REPO / "benchmarks").glob("*.py")} - HELPERS
    assert set(RUNS) == scripts


def run_script(script: str, args: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """The script in its own process group, killed by that group whatever happens (Ray's processes too)."""
    process = subprocess.Popen(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # scaling.py then stops the Ray nodes it started
            output, _ = process.communicate(timeout=60)
            output += f"\n(killed after {timeout} s)"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
    return process.returncode, output


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_with_its_smallest_arguments_and_prints_its_table(script, tmp_path, ray_tmpdir):
    (tmp_path / "tiny-tune.yaml").write_text(TINY_TUNE)
    run = RUNS[script]
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir, "GRADINV_CACHE": str(tmp_path / "zoo")}
    code, output = run_script(script, [arg.format(tmp=tmp_path) for arg in run.args], env)
    assert code == 0, output[-3000:]
    lines = output.splitlines()
    assert run.header in lines, output[-3000:]
    rows = [line for line in lines if re.match(run.row, line)]
    assert len(rows) == run.rows, output[-3000:]

"""A real multi-node Ray cluster on this machine: a study survives losing a worker node."""

import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from gradinv.results.store import ResultsDir
from tests.support.local_cluster import LocalCluster

STUDY = """
name: multinode
data: {dataset: faces, images: 6, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 150, train_subset: 64}
grid:
  trained_epochs: [0, 1]
  attack_seed: [0, 1]
resources: {num_cpus: 1}
max_retries: 3
"""


@pytest.fixture
def cluster():
    # A short private directory: Ray's socket paths must stay under the kernel's length limit.
    with tempfile.TemporaryDirectory(prefix="gi-", dir="/tmp") as temp:
        local = LocalCluster(Path(temp))
        try:
            yield local
        finally:
            local.stop()


def test_a_study_finishes_with_exactly_n_rows_after_a_worker_node_is_lost(cluster, write_study, tmp_path, driver):
    cluster.start_head()
    for name in ("node_a", "node_b"):  # each node has its own checkpoint cache: no shared disk
        cluster.add_worker(name, env={"GRADINV_CACHE": str(tmp_path / f"cache-{name}")})
    study = write_study(STUDY)
    results = tmp_path / "results"
    run = driver(
        "run",
        str(study),
        "--results",
        str(results),
        "--address",
        cluster.address,
        "--no-progress",
        "--batch-rows",
        "1",
        env=cluster.env,
    )
    deadline = time.monotonic() + 300
    while len(ResultsDir(results).files()) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    cluster.stop_node("node_b")  # mid-study: its running trials and stored objects are lost
    code, output = run.wait(timeout=600)
    assert code == 0, output
    frame = pd.read_parquet(results)
    assert len(frame) == 24 and frame["key"].is_unique
    assert (frame["status"] == "ok").all(), frame.loc[frame["status"] != "ok", "error"].tolist()
    assert frame["node_id"].nunique() == 2
    assert frame.loc[frame["trained_epochs"] == 1, "checkpoint_key"].notna().all()

"""Results in object storage, against a real S3 server (moto's, on 127.0.0.1): rows exactly once through a
SIGKILL, one driver at a time, readers from the URI, and one line for every way the endpoint can fail."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradinv.results.journal import JOURNAL_DIR, RowJournal
from gradinv.results.lease import LEASE_NAME
from gradinv.results.location import local_home
from gradinv.results.remote import open_store
from gradinv.results.schema import to_table, trial_key
from sweep.cli.main import main
from sweep.study import load_study
from tests.support.local_cluster import RAY, LocalCluster, free_port
from tests.support.s3 import S3Server, serving

REPO = Path(__file__).resolve().parent.parent
BUCKET, PREFIX = "gradinv-results", "studies/tiny"
URI = f"s3://{BUCKET}/{PREFIX}"
STUDY = """
name: tiny-s3
data: {{dataset: faces, images: {images}, image_size: 8}}
fixed: {{model: convnet, width: 2, iterations: 3}}
grid:
  fl: [fedsgd, fedavg]
resources: {{num_cpus: 1}}
max_retries: 1
"""


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3 server with one bucket; this process's environment (and its drivers') points at it."""
    with serving(monkeypatch, tmp_path, BUCKET) as server:
        yield server


def objects(server: S3Server) -> list[str]:
    """The objects under the prefix, less the folder markers pyarrow leaves ('…/')."""
    return [key for key in server.keys(BUCKET, PREFIX) if not key.endswith("/")]


def stored(columns=("key", "finished_at")) -> pd.DataFrame:
    return open_store(URI).read(list(columns)).to_pandas()


def test_a_study_into_s3_is_read_back_by_every_verb(write_study, s3, tmp_path, capsys, ray_tmpdir):
    study_path = write_study(STUDY.format(images=3))
    assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 0
    keys = sorted(trial_key(t) for t in load_study(study_path).trials)
    frame = stored()
    assert sorted(frame["key"]) == keys and len(keys) == 6
    names = objects(s3)
    assert len(names) == 1 and re.fullmatch(rf"{PREFIX}/part-\d{{19}}-[0-9a-f]{{8}}\.parquet", names[0]), names
    # pyarrow alone reads the prefix as a dataset (folder markers and '_' names are skipped)
    raw = pafs.S3FileSystem(endpoint_override=s3.endpoint, region="us-east-1")
    assert sorted(pq.read_table(f"{BUCKET}/{PREFIX}", filesystem=raw)["key"].to_pylist()) == keys
    assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 0
    assert "already have rows" in capsys.readouterr().out

    assert main(["status", URI]) == 0
    assert f"{URI}: 6 rows in 1 files" in capsys.readouterr().out
    assert main(["report", URI, "--out", str(tmp_path / "report.html")]) == 0
    assert "<html" in (tmp_path / "report.html").read_text()
    assert main(["export", URI, "--to", str(tmp_path / "export")]) == 0
    assert len(pd.read_csv(tmp_path / "export" / "index.csv")) == 6
    capsys.readouterr()
    assert main(["attack", "--replay", URI, keys[0]]) == 0
    assert "identical: yes" in capsys.readouterr().out


def test_sigkill_mid_study_then_a_rerun_ends_with_exactly_one_row_per_trial(
    write_study, s3, tmp_path, driver, capsys, ray_tmpdir
):
    """The journal on the driver's disk keeps what a killed driver received; a second driver meanwhile is
    refused in one line; the rerun takes the dead driver's lease at once, folds its journal and runs the rest."""
    study_path = write_study(STUDY.format(images=8))
    keys = [trial_key(t) for t in load_study(study_path).trials]
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({keys[0]: "sleep:600"}))  # one trial stays in flight: the run never ends
    args = ("run", str(study_path), "--results", URI, "--batch-seconds", "600")
    first = driver(*args, env={"GRADINV_FAULTS": str(faults)})  # RAY_TMPDIR: ray_tmpdir's

    def on_disk() -> pd.DataFrame:
        columns = ["key", "finished_at"]
        return pd.concat([stored(columns), open_store(URI).read_journal(columns).to_pandas()])

    deadline = time.monotonic() + 240
    while len(on_disk()) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 2  # a live driver holds the lease
    refusal = capsys.readouterr().err
    assert refusal.count("\n") == 1 and "another gradinv driver" in refusal and f"--results: '{URI}'" in refusal
    first.signal(signal.SIGKILL)
    _, output = first.wait()
    kept = on_disk()
    assert 4 <= len(kept) < 16 and f"{PREFIX}/{LEASE_NAME}" in objects(s3), output  # the dead driver's lease

    faults.write_text("{}")
    code, output = driver(*args).wait()
    assert code == 0, output
    frame = stored().set_index("key")
    assert len(frame) == 16 and frame.index.is_unique and sorted(frame.index) == sorted(keys)
    assert (frame.loc[kept["key"], "finished_at"].to_numpy() == kept["finished_at"].to_numpy()).all()  # not run again
    assert open_store(URI).journalled_rows() == 0
    assert all(name.rsplit("/", 1)[1].startswith("part-") for name in objects(s3))  # no lease, nothing staged


def test_an_upload_that_fails_keeps_the_rows_for_the_rerun(write_study, s3, monkeypatch, capsys, ray_tmpdir):
    from gradinv.results.location import Location

    study_path = write_study(STUDY.format(images=3))

    def broken(self, name, data):
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7")

    with monkeypatch.context() as patch:
        patch.setattr(Location, "write_whole", broken)
        assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot write results to {URI}" in message and "6 finished rows kept in" in message, message
    assert open_store(URI).journalled_rows() == 6 and stored().empty
    assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 0  # folds the journal: runs nothing
    assert "all 6 trials of tiny-s3 already have rows" in capsys.readouterr().out
    assert len(stored()) == 6 and open_store(URI).journalled_rows() == 0


TUNE = """
name: tiny-tune
data: {dataset: faces, images: 2, image_size: 8}
fixed: {model: convnet, width: 2}
resources: {num_cpus: 1}
tune:
  budget: 16
  candidates: 2
  parallel: 1
  tuning_images: 1
  held_out_images: 1
  sampler: {name: random, seed: 3}
  space:
    lr: [1.0e-4, 0.3]
"""


def test_tune_into_s3_keeps_optuna_on_the_driver_disk(write_study, s3, capsys, ray_tmpdir):
    assert main(["tune", str(write_study(TUNE, "tune.yaml")), "--results", URI, "--no-progress"]) == 0
    home = local_home(URI)
    assert (
        home / "_optuna.journal"
    ).is_file() and f"optuna-dashboard {home / '_optuna.journal'}" in capsys.readouterr().out
    names = objects(s3)
    assert f"{PREFIX}/_best.yaml" in names and not any("_optuna" in name for name in names)
    frame = stored(["key", "status"])
    assert len(frame) >= 3 and frame["key"].is_unique  # the candidates' trials and the held-out comparison


def _lease(host: str, pid: int, expires_in: float) -> bytes:
    lease = {"owner": f"{host}:{pid}:feed", "host": host, "pid": pid, "expires": time.time() + expires_in}
    return json.dumps(lease).encode()


def test_a_live_foreign_lease_refuses_an_expired_or_dead_one_is_taken(write_study, s3, capsys):
    study_path = write_study(STUDY.format(images=1))
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{LEASE_NAME}", Body=_lease("elsewhere", 1, 60))
    assert main(["run", str(study_path), "--results", URI, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "another gradinv driver (elsewhere:1:feed)" in error and "--results" in error
    for host, pid, expires_in in (("elsewhere", 1, -1), (socket.gethostname(), _dead_pid(), 60)):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{LEASE_NAME}", Body=_lease(host, pid, expires_in))
        with open_store(URI) as results:
            held = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{LEASE_NAME}")["Body"].read())
            assert held["owner"] == results._lease.owner and held["pid"] == os.getpid()
        assert objects(s3) == []  # released: the lease is gone


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("failure", ["missing bucket", "unreachable endpoint", "missing credentials"])
def test_an_endpoint_failure_is_one_line_and_the_journal_stays(write_study, s3, monkeypatch, capsys, failure):
    uri = URI
    if failure == "missing bucket":
        uri = f"s3://no-such-bucket/{PREFIX}"
    elif failure == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    else:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    rows = [{"study": "tiny-s3", "key": f"{i:020x}", "status": "ok", "psnr": 20.0} for i in range(3)]
    journal_dir = local_home(uri) / JOURNAL_DIR
    journal_dir.mkdir(parents=True)
    journal = RowJournal(journal_dir, to_table(rows).schema)  # what a driver killed earlier left
    journal.append(to_table(rows))
    journal.close()
    before = sorted(journal_dir.iterdir())

    study_path = write_study(STUDY.format(images=1))
    for argv in (["run", str(study_path), "--results", uri, "--no-progress"], ["status", uri]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Traceback" not in error and f"'{uri}'" in error, error
        expected = {"missing bucket": "does not exist", "unreachable": "cannot be reached", "missing": "credentials"}
        assert any(failure.startswith(k) and v in error for k, v in expected.items()), error
    assert sorted(journal_dir.iterdir()) == before
    assert open_store(f"file://{journal_dir.parent}").journalled_rows() == 3  # read as a local directory's journal


def test_a_ray_job_writes_its_rows_into_the_bucket(write_study, s3, tmp_path):
    """`ray job submit --working-dir . -- gradinv run ... --results s3://...` against a head started with
    `ray start --head` (token authentication on): the job's driver runs on the head and its rows land in
    the bucket (its credentials and endpoint: the head's environment, which the job inherits)."""
    study_path = write_study(STUDY.format(images=2))
    with tempfile.TemporaryDirectory(prefix="gj-", dir="/tmp") as temp:  # short: Ray's socket paths
        cluster = LocalCluster(Path(temp))
        jobs = f"http://127.0.0.1:{free_port()}"
        try:
            head = ["--head", f"--port={cluster.port}", "--num-cpus=2", "--dashboard-host=127.0.0.1"]
            cluster._start("head", [*head, f"--dashboard-port={jobs.rsplit(':', 1)[1]}"], {})
            cluster.wait_for_nodes(1)
            _wait_for_the_job_api(jobs, cluster.env)
            entrypoint = [sys.executable, "-m", "sweep", "run", str(study_path), "--results", URI, "--no-progress"]
            submit = [RAY, "job", "submit", "--address", jobs, "--working-dir", str(REPO), "--", *entrypoint]
            done = _submit_once_an_agent_answers(submit, cluster.env)
        finally:
            cluster.stop()
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    frame = stored()
    assert sorted(frame["key"]) == sorted(trial_key(t) for t in load_study(study_path).trials) and len(frame) == 4


def _submit_once_an_agent_answers(submit: list[str], env: dict, timeout: float = 120):
    """`ray job submit`, again while the head's job agent has not registered yet: the job API answers
    before it does, and Ray then refuses the submission ("No available agent to submit job, please try
    again later") before anything runs. Any other outcome is returned at once."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(1)


def _wait_for_the_job_api(address: str, env: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, timeout=60)
        if listed.returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"no job API at {address} after {timeout} s")

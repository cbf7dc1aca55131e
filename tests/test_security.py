"""What a local user other than the one running gradinv can reach: the local instance's token and
temporary directory, the terminal of whoever reads a crafted results directory, the files a link
placed where gradinv writes would lead to; and a cluster address where nothing listens."""

import os
import socket
import stat
from pathlib import Path

import pytest

from gradinv.results.store import ResultsDir
from sweep.cli.main import main
from sweep.ray_connection import connect
from tests.test_results_faults import trial_rows

CRAFTED = "\x1b]0;pwned\x07\x1b[2J\x1b[HFAKE: all trials ok"  # retitle, clear the screen, home the cursor
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[HFAKE: all trials ok"
STUDY = """\
name: security
data: {dataset: faces, images: 1, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 3}
resources: {num_cpus: 1}
"""


def private(path: Path) -> bool:
    """Owned by this user, and no one else may read, write or enter it."""
    info = os.lstat(path)
    return info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home directory as Debian makes it (0755), with no token sources in the environment."""
    path = tmp_path / "home"
    path.mkdir(mode=0o755)
    monkeypatch.setenv("HOME", str(path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def umask_022():
    """The usual umask, under which a file made without an explicit mode is readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_local_run_keeps_its_token_and_temporary_directory_to_its_user(home, ray_tmpdir, umask_022):
    import psutil  # after ray: Ray's bundled psutil
    import ray

    own_dir = Path(ray_tmpdir) / f"gradinv-{os.getuid()}"
    own_dir.mkdir(mode=0o755)  # left open by someone: the start tightens it
    try:
        connect(None, {}, max_retries=0)
        token = ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_TOKEN")).remote())
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        processes = psutil.Process().children(recursive=True)
        command_lines = [" ".join(process.cmdline()) for process in processes]
        files = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]
        sockets = [path for path in session.rglob("*") if stat.S_ISSOCK(os.lstat(path).st_mode)]
        with_token = [path for path in files if token.encode() in path.read_bytes()]
    finally:
        ray.shutdown()
    assert len(token) == 64 and os.environ.get("RAY_AUTH_TOKEN") is None  # the workers' token, gone from ours
    assert list(home.rglob("*")) == []  # no ~/.ray/auth_token
    assert [line for line in command_lines if token in line] == []  # `ps` shows command lines to everyone
    assert with_token == []
    assert session.parent.parent == own_dir
    assert [path for path in (own_dir, session.parent, session) if not private(path)] == []
    assert len(sockets) >= 2  # the raylet's and the object store's
    assert [path for path in sockets if not private(path.parent)] == []


def test_a_link_in_place_of_the_private_temporary_directory_is_refused(home, ray_tmpdir, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    (Path(ray_tmpdir) / f"gradinv-{os.getuid()}").symlink_to(elsewhere)
    (tmp_path / "study.yaml").write_text(STUDY)
    code = main(["run", str(tmp_path / "study.yaml"), "--results", str(tmp_path / "results"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"gradinv run: error: RAY_TMPDIR: '{ray_tmpdir}' is not valid; ")
    assert "is not a directory of yours" in err
    assert list(elsewhere.iterdir()) == []


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("named_by", ["--address", "RAY_ADDRESS"])
def test_a_cluster_address_where_nothing_listens_is_one_line_naming_it(named_by, tmp_path, monkeypatch, capsys):
    address = f"127.0.0.1:{free_loopback_port()}"
    (tmp_path / "study.yaml").write_text(STUDY)
    args = ["run", str(tmp_path / "study.yaml"), "--results", str(tmp_path / "results"), "--no-progress"]
    if named_by == "--address":
        args += ["--address", address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"gradinv run: error: {named_by}: '{address}' is not valid; nothing accepts connections there ("
    )
    assert "Connection refused); start the cluster's head first (ray start --head)" in err


def crafted_results(tmp_path: Path) -> Path:
    rows = trial_rows(4)
    rows[0].update(status="failed", error=CRAFTED)
    rows[1].update(study="\x1b[31mred\x1b[0m")
    path = tmp_path / "results"
    with ResultsDir(path) as directory:
        directory.write(rows)
    return path


def test_status_shows_control_characters_from_the_files_as_escapes(tmp_path, capsys):
    results = crafted_results(tmp_path)
    assert main(["status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert f": {SHOWN}\n" in out + "\n"  # the newest error, readable
    assert "\\x1b[31mred\\x1b[0m" in out  # the study name in the counts


def test_the_report_holds_no_control_characters_from_the_files(tmp_path, capsys):
    results = crafted_results(tmp_path)
    assert main(["report", str(results), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "\x1b" not in page and "\x07" not in page
    assert f"<td class=text words>{SHOWN}</td>" in page  # the failures table


def test_export_and_report_never_write_through_a_link_at_a_temporary_name(tmp_path, capsys):
    results = tmp_path / "results"
    with ResultsDir(results) as directory:
        directory.write(trial_rows(2))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    to = tmp_path / "export"
    to.mkdir()
    for name in (".index.csv.tmp", ".index.parquet.tmp"):  # the names export used to write through
        (to / name).symlink_to(victim)
    (tmp_path / ".report.html.tmp").symlink_to(victim)  # the name report used to write through
    assert main(["export", str(results), "--to", str(to)]) == 0
    assert main(["report", str(results), "--out", str(tmp_path / "report.html")]) == 0
    assert victim.read_text() == "precious"
    assert len((to / "index.csv").read_text().splitlines()) == 1 + 2  # a header and one row per image
    assert (tmp_path / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

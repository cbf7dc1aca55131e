import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_study(tmp_path):
    """Write a study file from YAML text; returns its path."""

    def write(text: str, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


class Driver:
    """A `gradinv` command in its own process group, so that it and every process it starts
    (a local Ray instance included) can be stopped by that group's id."""

    def __init__(self, *args: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sweep", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            output, _ = self.process.communicate(timeout=timeout)
        finally:
            self.stop_group()
        return self.process.returncode, output

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def stop_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def driver():
    started: list[Driver] = []

    def start(*args: str, env: dict | None = None) -> Driver:
        started.append(Driver(*args, env=env))
        return started[-1]

    yield start
    for each in started:
        each.stop_group()


class Bars:
    """Numeric bars: each check asserts a value against its threshold and, when GRADINV_BAR_LOG names a
    file, first appends ``{bar, value, threshold, ...}`` to it as a JSON line, so that
    ``benchmarks/portability.py`` can report how far each bar's quantity moves across kernels, threads
    and seeds. ``holds=False`` marks a control (the attack disabled): there the bar must not hold."""

    def __init__(self):
        self.seed_offset = int(os.environ.get("GRADINV_BAR_SEED", "0"))  # varied by the portability script

    def seeds(self, count: int) -> list[int]:
        """Attack seeds for ``count`` trials; ``make test`` uses 0..count-1."""
        return list(range(self.seed_offset * count, (self.seed_offset + 1) * count))

    def at_least(self, bar: str, value: float, threshold: float, *, holds: bool = True) -> None:
        self._check(bar, value, threshold, ">=", value >= threshold, holds)

    def below(self, bar: str, value: float, threshold: float, *, holds: bool = True) -> None:
        self._check(bar, value, threshold, "<", value < threshold, holds)

    def _check(self, bar, value, threshold, direction, cleared, holds):
        log = os.environ.get("GRADINV_BAR_LOG")
        if log:
            record = dict(
                bar=bar,
                value=float(value),
                threshold=threshold,
                direction=direction,
                holds=holds,
                seed_offset=self.seed_offset,
            )
            with open(log, "a") as lines:
                lines.write(json.dumps(record) + "\n")
        expected = "clear" if holds else "stay short of"
        assert cleared == holds, f"{bar}: {value:.6g} should {expected} the bar {direction} {threshold}"


@pytest.fixture
def bars() -> Bars:
    return Bars()


@pytest.fixture(scope="session", autouse=True)
def ray_session_files():
    """Every local Ray instance the tests start, in this process or a driver's, keeps its session files in
    one short private directory removed at the end, not in the user's own (/tmp/gradinv-<uid>)."""
    path = tempfile.mkdtemp(prefix="gt")
    with pytest.MonkeyPatch.context() as session:
        session.setenv("RAY_TMPDIR", path)
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A short private temp dir for Ray's sessions (socket paths are length-limited), removed after."""
    path = tempfile.mkdtemp(prefix="gt")
    monkeypatch.setenv("RAY_TMPDIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's status once everything is written, before the interpreter's teardown.

    Many tests start and stop Ray inside this process, and threads of Ray's native library outlive
    ray.shutdown() across such restarts (ray-project/ray#31145). One full run (2026-12-06) printed
    "1086 passed" and then died in _raylet.so with SIGSEGV (exit 139) while the interpreter tore down.
    The exit handlers still run (pytest's own lock files, Ray's); only the native teardown is skipped.
    """
    if EXIT_STATUS in config.stash:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])

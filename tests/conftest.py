import os
import signal
import subprocess
import sys
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
            [sys.executable, "-m", "sweep", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip

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

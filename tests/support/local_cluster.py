"""A multi-node Ray cluster on one machine, from real `ray start` processes (tests and benchmarks).

Each node is a `ray start --block` process in its own process group, so that the node and every
process it started stop together when that group is killed: a lost node, as on a real cluster.
Token authentication is on, with a fresh token for the cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@dataclass
class LocalCluster:
    """A head without CPUs (it only coordinates) plus worker nodes added one by one."""

    temp_dir: Path
    nodes: dict = field(default_factory=dict)  # name -> Popen
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict:
        """The environment of every process of this cluster, drivers included. Their temporary files go in the
        cluster's own directory: a killed node leaves some behind (multiprocessing's pymp-* of Ray's dashboard)."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "TMPDIR": str(self.temp_dir)}

    @property
    def address(self) -> str:
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.port}"

    def start_head(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false"], {})
        self.wait_for_nodes(1)

    def add_worker(self, name: str, num_cpus: int = 1, env: dict | None = None) -> None:
        """Start a worker node and wait until it has joined (nodes started together can time out)."""
        self._start(
            name,
            [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--resources={json.dumps({name: 1})}"],
            env or {},
        )
        self.wait_for_nodes(len(self.nodes))

    def _start(self, name: str, args: list[str], env: dict) -> None:
        log = open(self.temp_dir / f"{name}.log", "w")
        command = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir / 'ray'}", *args]
        self.nodes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **env}, start_new_session=True
        )

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Until ``count`` nodes (the head included) are alive, asked from a short-lived driver."""
        probe = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes())); ray.shutdown()"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [sys.executable, "-c", probe, self.address],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=timeout,
            )
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} nodes in {timeout} s")

    def stop_node(self, name: str) -> None:
        """Kill a node and everything it started, by its process group."""
        process = self.nodes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            self.stop_node(name)


@contextmanager
def two_worker_nodes():
    """A fresh head with worker nodes node_a and node_b, stopped (every node's process group) on leaving."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gi-", dir="/tmp") as temp:  # short: Ray's socket paths
        cluster = LocalCluster(Path(temp))
        try:
            cluster.start_head()
            for node in ("node_a", "node_b"):
                cluster.add_worker(node)
            yield cluster
        finally:
            cluster.stop()


def run_study_on(cluster: LocalCluster, driver, study: Path, results: Path) -> tuple[int, str]:
    """``gradinv run`` of ``study`` on ``cluster``: the exit code and the output. ``driver`` is the tests'
    fixture that starts the CLI in a process."""
    args = ("run", str(study), "--results", str(results), "--address", cluster.address, "--no-progress")
    return driver(*args, env=cluster.env).wait(timeout=300)

"""What a local Ray instance started by gradinv listens on: loopback only, or nothing that answers."""

import contextlib
import http.client
import ipaddress
import shutil
import tempfile
import time
import urllib.error
import urllib.request

import ray  # puts Ray's bundled psutil on the path

# isort: split
import psutil  # comes with Ray: importable only once Ray is

from sweep.runner import connect, runtime_environment

METRICS_KEYS = (b"AutoscalerMetricsAddress", b"DashboardMetricsAddress")


def on_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def ray_processes() -> list:
    """The driver and every process it started; a local instance's processes descend from it."""
    driver = psutil.Process()
    return [driver, *driver.children(recursive=True)]


def listening(processes) -> dict[tuple[str, int], str]:
    """(address, port) -> the name of the process listening there."""
    found = {}
    for process in processes:
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[(conn.laddr.ip, conn.laddr.port)] = process.name()
        except psutil.NoSuchProcess:
            pass
    return found


def announced_endpoints_listen() -> bool:
    """Whether the Prometheus endpoints Ray announces for scraping (the node's exporter, the autoscaler's,
    the dashboard's) are all announced and listened on, by this instance or by another one on the machine."""
    from ray.experimental.internal_kv import _internal_kv_get

    addresses = [_internal_kv_get(key) for key in METRICS_KEYS]
    if not all(addresses):
        return False
    ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    ports |= {int(address.rsplit(b":", 1)[1]) for address in addresses}
    return ports <= {conn.laddr.port for conn in psutil.net_connections("tcp") if conn.status == psutil.CONN_LISTEN}


def answer_without_credentials(port: int) -> str:
    """What GET /metrics sent to 127.0.0.1 gets with no token (a wildcard socket answers there too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as refused:
        return f"HTTP {refused.code}"
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, reset, or not HTTP/1 (gRPC)
        return type(error).__name__


def open_without_credentials(ip: str, port: int) -> bool:
    """A socket another machine may reach that serves an unauthenticated request. Tests send nothing to
    the interface address, so a socket bound there (not loopback, not the wildcard) counts as open."""
    if on_loopback(ip):
        return False
    return not ipaddress.ip_address(ip).is_unspecified or answer_without_credentials(port).startswith("HTTP 2")


def test_a_local_instance_listens_on_loopback_or_answers_nothing_without_a_token(monkeypatch):
    temp = tempfile.mkdtemp(prefix="gradinv-net-")  # short: Ray's Unix socket paths must fit
    monkeypatch.setenv("RAY_TMPDIR", temp)
    started = []
    try:
        connect(None, runtime_environment(None), max_retries=1)
        ray.get(ray.remote(lambda: None).remote())
        started = ray_processes()[1:]
        assert {"gcs_server", "raylet"} <= {p.name() for p in started}  # Ray's processes descend from the driver
        # Ray's metrics servers start on their own; wait (bounded) until each endpoint Ray announces listens.
        # The dashboard's and the autoscaler's have fixed ports: another Ray instance on this machine may hold them.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not announced_endpoints_listen():
            time.sleep(0.5)
        started = ray_processes()[1:]
        sockets = listening([psutil.Process(), *started])
        open_ = sorted(
            f"{ip}:{port} ({name})" for (ip, port), name in sockets.items() if open_without_credentials(ip, port)
        )
        assert sockets and not open_, open_
    finally:
        ray.shutdown()
        for process in started:  # ray.shutdown() stops them; whatever it missed
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(temp, ignore_errors=True)

"""What refuses a study with one line before it runs: an address where nothing listens, a trial too large
for this machine's memory or a cluster's largest node, a damaged cache; and, once Ray is up, a trial whose
CPUs and GPUs no node has (a named cluster gets time to add one)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from gradinv import memory
from gradinv.errors import ConfigError

from .ray_connection import require_reachable
from .study import Resources, Study
from .task_loop import DEFAULT_LANES, device_of
from .victim_training import check_caches


def check_before_start(study: Study, address: str | None) -> Callable[[int, str], None]:
    """What can be refused before the results directory or Ray: an address where nothing listens, and on
    this machine a trial it cannot hold and a damaged cache (a cluster's nodes keep caches of their own).
    Returns the memory check, for a cluster's largest node once connected."""
    require_reachable(address)
    device = device_of(study)
    fits = functools.partial(memory.check_study, study, study.lanes or DEFAULT_LANES[device], device)
    if not (address or os.environ.get("RAY_ADDRESS")):
        fits(memory.machine_memory(), "this machine")
        check_caches(study.trials)
    return fits


class NodeFit:
    """Whether some node of the cluster can run one trial (its CPUs and GPUs on one node).

    A local instance has all the nodes it will get: a trial that fits none is refused at once. A
    named cluster may add nodes (its autoscaler sees the waiting tasks): it gets ``wait_seconds``
    to grow one that fits, then the run stops with the same one line.
    """

    POLL_SECONDS = 5.0

    def __init__(self, ray, resources: Resources, *, named_cluster: bool, wait_seconds: float, clock=time.monotonic):
        self.ray, self.resources, self.named_cluster, self.wait_seconds, self.clock = (
            ray,
            resources,
            named_cluster,
            wait_seconds,
            clock,
        )
        self.fits = False
        self.since = self.polled = None

    def check(self) -> None:
        """Raise ConfigError when no node fits and none may join (any longer); cheap once one fits."""
        if self.fits or (self.polled is not None and self.clock() - self.polled < self.POLL_SECONDS):
            return
        self.polled = self.clock()
        shortfall = _shortfall([node["Resources"] for node in self.ray.nodes() if node.get("Alive")], self.resources)
        if shortfall is None:
            self.fits = True
            return
        field, value, largest = shortfall
        if not self.named_cluster:
            fix = "on this machine's Ray instance; ask for less per trial, or pass --address to use larger nodes"
            raise ConfigError(field, value, f"{largest} {fix}")
        if self.since is None:
            self.since = self.polled
            print(
                f"no node fits one trial ({field} {value}; {largest}): "
                f"waiting up to {self.wait_seconds:g} s for the cluster to add one"
            )
        elif self.polled - self.since >= self.wait_seconds:
            fix = "for the cluster to add a larger node; ask for less per trial or give the cluster such nodes"
            raise ConfigError(field, value, f"{largest}, after waiting {self.wait_seconds:g} s {fix}")


def _shortfall(nodes: list[dict], resources: Resources) -> tuple[str, float, str] | None:
    """(field, value, what the largest node has) when no node has a trial's CPUs and GPUs; else None."""
    needs = {"CPU": _plain(resources.num_cpus), "GPU": _plain(resources.num_gpus)}
    if any(all(node.get(name, 0) >= amount for name, amount in needs.items()) for node in nodes):
        return None
    for name, field in (("CPU", "resources.num_cpus"), ("GPU", "resources.num_gpus")):
        largest = max((node.get(name, 0) for node in nodes), default=0)
        if needs[name] > largest:
            return field, needs[name], f"the largest node has {largest:g} {name}s"
    return "resources", {"num_cpus": needs["CPU"], "num_gpus": needs["GPU"]}, "no node has both that many CPUs and GPUs"


def _plain(number: float) -> float | int:
    return int(number) if float(number).is_integer() else number

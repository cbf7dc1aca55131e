"""How a driver reaches Ray: a named cluster with token authentication, or a local instance of its own.

A local instance serves one driver on one machine, so every socket it opens stays on 127.0.0.1.
A cluster (``--address`` / $RAY_ADDRESS, see clusters/) listens on the node's interface address and
relies on Ray's token authentication, which stays on.
"""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK = "127.0.0.1"


def connect(address: str | None, runtime_env: dict, max_retries: int):
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local Ray instance."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    options = dict(runtime_env=runtime_env, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if address is None:
        _start_local(ray, options, max_retries)
        return ray
    if not os.environ.get("RAY_AUTH_MODE") and _token_available():
        # A driver that names its cluster does not turn token mode on by itself.
        os.environ["RAY_AUTH_MODE"] = "token"
    ray.init(address=address, **options)
    return ray


def _start_local(ray, options: dict, max_retries: int) -> None:
    """A new instance ("local": never a stray one found in /tmp/ray) whose servers all bind 127.0.0.1.

    Ray binds its GCS, raylet, worker, agent and metrics servers to loopback when the node's address
    is loopback, but ray.init rewrites ``_node_ip_address="127.0.0.1"`` to the interface address
    unless Ray runs in its single-machine mode (the default on macOS and Windows; on Linux only
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported turns it on). The mode is switched for
    this start alone: a later driver in the same process may still join a cluster.
    """
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # Cap Ray's out-of-memory retries, unlimited by default, like ours.
        ray.init(address="local", _node_ip_address=LOOPBACK, _system_config={"task_oom_retries": max_retries},
                 **options)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())  # fmt: skip

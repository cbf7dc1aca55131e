"""How a driver reaches Ray: a named cluster with token authentication, or a local instance of its own.

A local instance serves one driver on one machine, so every socket it opens stays on 127.0.0.1.
A cluster (``--address`` / $RAY_ADDRESS, see clusters/) listens on the node's interface address and
relies on Ray's token authentication, which stays on.

A local instance is private to the user who starts it as well: its token lives in this process's
environment, never in a file another user could read, and its temporary directory sits in one only
this user can enter (clusters/README.md, "Who can read the token").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path

from gradinv.errors import ConfigError

LOOPBACK = "127.0.0.1"
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where Ray looks before ~/.ray/auth_token
PROBE_SECONDS = 5  # a head that is up accepts a TCP connection well within this
UNREACHABLE_FIX = (
    "start the cluster's head first (ray start --head) or give the address it printed "
    "as HOST:PORT (the GCS port, 6379 by default); leave --address out to run locally"
)


def connect(address: str | None, runtime_env: dict, max_retries: int):
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local Ray instance."""
    import ray

    from .stopping import keep_driver_sigterm_handler

    keep_driver_sigterm_handler()  # SIGTERM while Ray starts: the command's one line and 143, not exit(15)
    require_reachable(address)
    field, address = _named(address)
    options = dict(runtime_env=runtime_env, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if address in (None, "local"):  # Ray's own "local" start would skip everything _start_local secures
        _start_local(ray, options, max_retries)
        return ray
    if not os.environ.get("RAY_AUTH_MODE") and _token_available():
        # A driver that names its cluster does not turn token mode on by itself.
        os.environ["RAY_AUTH_MODE"] = "token"
    _reload_token()  # the cluster's token, not a local instance's that this process started before
    try:
        ray.init(address=address, **options)
    except ConnectionError:  # something listens there, but no Ray head answered Ray's retries
        raise ConfigError(field, address, UNREACHABLE_FIX) from None
    return ray


def require_reachable(address: str | None) -> None:
    """Refuse, in seconds, a cluster address where nothing accepts a connection: Ray retries one for
    minutes. ``address`` as ``connect`` takes it; a driver that writes something first checks before."""
    field, address = _named(address)
    if address in (None, "local", "auto"):  # a local instance, or Ray's own look-up of one
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")  # ray://HOST:PORT (Ray Client), HOST:PORT (GCS)
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(field, address, "give the head's address as HOST:PORT, e.g. 10.0.0.5:6379")
    from ray._private.services import resolve_ip_for_localhost

    host = resolve_ip_for_localhost(host)  # as Ray does: a loopback address means this node's own address
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ConfigError(
            field, address, f"nothing accepts connections there ({host}:{port}: {reason}); {UNREACHABLE_FIX}"
        ) from None


def _named(address: str | None) -> tuple[str, str | None]:
    """The option that names the cluster, and its address (None: no cluster named)."""
    return ("--address" if address else "RAY_ADDRESS"), address or os.environ.get("RAY_ADDRESS") or None


def _start_local(ray, options: dict, max_retries: int) -> None:
    """A new instance ("local": never a stray one found in /tmp/ray) whose servers all bind 127.0.0.1.

    Ray binds its GCS, raylet, worker, agent and metrics servers to loopback when the node's address
    is loopback, but ray.init rewrites ``_node_ip_address="127.0.0.1"`` to the interface address
    unless Ray runs in its single-machine mode (the default on macOS and Windows; on Linux only
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported turns it on). The mode is switched for
    this start alone: a later driver in the same process may still join a cluster.
    """
    from ray._private import ray_constants

    temp_dir = _private_temp_dir()
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _fresh_token():
            # Cap Ray's out-of-memory retries, unlimited by default, like ours.
            ray.init(
                address="local",
                _node_ip_address=LOOPBACK,
                _temp_dir=str(temp_dir),
                _system_config={"task_oom_retries": max_retries},
                **options,
            )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for opened in (temp_dir, session, session / "sockets"):  # Ray opens these to everyone (0777)
        os.chmod(opened, 0o700)


def _private_temp_dir() -> Path:
    """Ray's temporary directory for a local instance, inside a per-user directory mode 0700.

    Ray makes its temporary, session, socket and log directories 0777 (shared /tmp/ray by default): any
    local user could then read the logs and replace the raylet's or the object store's Unix socket.
    The per-user directory (in $RAY_TMPDIR, else $TMPDIR, else /tmp, as Ray chooses) keeps everyone
    else out of all of them, whatever modes Ray gives what is inside.
    """
    from ray._common.utils import get_default_system_temp_dir

    private = Path(get_default_system_temp_dir()) / f"gradinv-{os.getuid()}"
    try:
        private.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            private.mkdir(mode=0o700)
        found = os.lstat(private)
    except OSError as error:
        fix = f"set it to a directory you can write ({error.strerror})"
        raise ConfigError("RAY_TMPDIR", str(private.parent), fix) from None
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():  # planted by someone else, or a link
        raise ConfigError(
            "RAY_TMPDIR",
            str(private.parent),
            f"{private} is not a directory of yours: remove it, or set RAY_TMPDIR to a directory of your own",
        )
    os.chmod(private, 0o700)  # not a link (checked), so this tightens the directory itself
    return private / "ray"


@contextlib.contextmanager
def _fresh_token():
    """Token authentication on, with a new token for this instance alone, held in the environment.

    Left to itself, Ray writes ~/.ray/auth_token with the umask's mode (0644 by default): any local user
    could read it and, through the instance's GCS, run code as this user. Ray's processes inherit the
    token from this process's environment, which only its user can read; the variables are restored
    after the start so a later driver in this process joins a cluster with the cluster's own token.
    """
    from ray._raylet import Config

    saved = {name: os.environ.pop(name, None) for name in TOKEN_SOURCES}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["RAY_AUTH_MODE"] = "token"  # never disabled for an instance gradinv starts
    Config.initialize("")  # Ray caches the mode it read first
    _reload_token()
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _reload_token() -> None:
    """Make Ray read the token again from its sources: it caches the first one it loads."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def _token_available() -> bool:
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").exists()
    )

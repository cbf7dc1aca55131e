"""Where results live: a local directory, or a prefix in object storage named by a URI.

``--results`` takes a path or any URI ``pyarrow.fs.FileSystem.from_uri`` accepts (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://...``); ``file://`` URIs are local directories. S3 is opened here rather
than by ``from_uri`` so that its credentials are checked first (without any, the AWS SDK would send
unsigned requests, or wait on the EC2 metadata service) and an unreachable endpoint fails in seconds.
pyarrow honours ``AWS_ENDPOINT_URL`` itself; it is read here too, so that older pyarrows do as well.

A remote location keeps the driver's own files on the driver's disk (the row journal, Optuna's
storage): ``local_home`` names the place, ``$GRADINV_JOURNALS/<digest of the URI>`` (default
``~/.cache/gradinv/journals``), so that a rerun on the same machine finds a dead driver's rows.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from gradinv.errors import ConfigError

JOURNALS_ENV = "GRADINV_JOURNALS"
FLAG = "--results"
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)
CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials); "
    "on EC2 an instance role is used"
)


def is_remote(results: str | os.PathLike) -> bool:
    """Whether ``results`` names object storage (a URI other than ``file://``); a Path is always local."""
    if isinstance(results, os.PathLike):
        return False
    scheme = urlparse(str(results)).scheme
    return "://" in str(results) and len(scheme) > 1 and scheme != "file"


def local_path(results: str | os.PathLike) -> Path:
    """A local results directory's path (``file:///x`` is ``/x``)."""
    text = os.fspath(results)
    return Path(urlparse(text).path) if text.startswith("file://") else Path(text)


@dataclass(frozen=True)
class Location:
    """A prefix in object storage: ``fs`` and ``root`` (``bucket/prefix``), with the operations a results
    store needs. Names are relative to ``root``; an unreachable endpoint or missing bucket raises OSError."""

    uri: str
    fs: pafs.FileSystem
    root: str

    def full(self, name: str) -> str:
        return f"{self.root}/{name}"

    def entries(self) -> list[pafs.FileInfo]:
        """What sits directly under the prefix (an absent prefix is empty: S3 has no empty folders)."""
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda info: info.path)

    def require_bucket(self) -> None:
        """Touches the endpoint: a missing bucket, wrong credentials or no route raise here, before any work."""
        self.entries()
        bucket = self.root.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(FLAG, self.uri, f"bucket {bucket!r} does not exist; create it or name another")

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.full(name)) as source:
            return source.read()

    def write_whole(self, name: str, data: bytes) -> None:
        """One object, whole: staged under a hidden name, then copied into place (a server-side copy makes
        the final object appear complete or not at all, even if the upload broke off)."""
        staged = f"{STAGING}/{name}.{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with self.fs.open_output_stream(self.full(staged)) as sink:
                sink.write(data)
            self.fs.move(self.full(staged), self.full(name))  # S3: a copy, then the staged one deleted
        except BaseException:
            self.delete(staged)
            raise

    def put(self, name: str, data: bytes) -> None:
        """A small object written in one request (the lease): a single PUT is atomic already."""
        with self.fs.open_output_stream(self.full(name)) as sink:
            sink.write(data)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.full(name))
        except FileNotFoundError:
            pass

    def clear_staging(self) -> None:
        """Staged objects a dead driver left (never visible to readers: '_' names are skipped)."""
        selector = pafs.FileSelector(self.full(STAGING), recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(info.path)


STAGING = "_staging"


def open_location(uri: str) -> Location:
    """The filesystem and root of a results URI; a URI pyarrow cannot open is one line (ConfigError)."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ConfigError(FLAG, uri, "name a bucket and a prefix, e.g. s3://bucket/studies/quickstart")
    try:
        if parsed.scheme == "s3":
            fs, root = _s3(uri, parsed.netloc), f"{parsed.netloc}{parsed.path}"
        else:
            fs, root = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, ImportError) as error:  # an unknown scheme, a filesystem pyarrow lacks
        fix = f"pyarrow cannot open it ({first_line(error)}); give s3://, gs:// or a local directory"
        raise ConfigError(FLAG, uri, fix) from None
    return Location(uri.rstrip("/"), fs, root.rstrip("/"))


def _s3(uri: str, bucket: str) -> pafs.S3FileSystem:
    if not _has_credentials():
        raise ConfigError(FLAG, uri, f"no AWS credentials found; {CREDENTIALS_FIX}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and endpoint is None:
        region = pafs.resolve_s3_region(bucket)  # AWS itself: the bucket's region, else requests are redirected
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        region=region,
        connect_timeout=5,
        allow_delayed_open=True,  # a small object is one PUT at close, not three requests
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def _has_credentials() -> bool:
    """The AWS credential chain's sources, looked at without a request (the instance role: a quick probe)."""
    if any(os.environ.get(name) for name in CREDENTIAL_ENV):
        return True
    shared = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")]
    shared.append(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(Path(path).expanduser().is_file() for path in shared):
        return True
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return False
    try:  # EC2's metadata service (an instance role) answers on a link-local address, or not at all
        socket.create_connection(("169.254.169.254", 80), timeout=0.5).close()
        return True
    except OSError:
        return False


def local_home(uri: str) -> Path:
    """The driver-local place of a remote location's journal and Optuna storage."""
    base = Path(os.environ.get(JOURNALS_ENV) or "~/.cache/gradinv/journals").expanduser()
    return base / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def reach_error(uri: str, error: OSError) -> ConfigError:
    """An OSError of the endpoint (no route, no bucket, refused credentials) as one line that names the fix."""
    text = first_line(error)
    if "NO_SUCH_BUCKET" in text or "does not exist" in text:
        fix = "its bucket does not exist; create it (aws s3 mb) or name another"
    elif "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        fix = f"the credentials were refused; {CREDENTIALS_FIX}"
    elif "NETWORK_CONNECTION" in text or "connect" in text.lower():
        fix = "its endpoint cannot be reached; check AWS_ENDPOINT_URL and the network"
    else:
        fix = "check the bucket, the credentials and AWS_ENDPOINT_URL"
    return ConfigError(FLAG, uri, f"{fix} ({text})")


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]

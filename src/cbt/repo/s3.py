"""A vault in an S3 bucket: :class:`S3Storage` over ``obstore``.

Location ``s3://BUCKET/PREFIX`` (the prefix may be empty: the bucket's root).
Where the server is and who cbt is come only from the standard AWS settings:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``),
``AWS_ENDPOINT_URL``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), and
``AWS_PROFILE``'s section of ``~/.aws/credentials`` and ``~/.aws/config``
(``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``); a variable wins over
a file, but the credentials are one set, never half of each: the variables'
(key id, secret and token) when a key id or secret is set there, else the
profile's.  Nothing cbt-specific, and nothing else: obstore's own reading of
every ``AWS_*`` variable is overridden (:func:`_store`), so no other variable
changes a request (a stale ``AWS_SESSION_TOKEN`` beside a profile's keys,
``AWS_SKIP_SIGNATURE``, ``AWS_CONDITIONAL_PUT``, ``AWS_ENDPOINT_URL_S3``...);
no credentials at all are unsigned requests, never a question to the instance
metadata service.  An endpoint must be an ASCII ``http(s)://`` URL.

Why obstore (``bench/s3_clients.py --runs 3 --size 128M`` against SeaweedFS
here, medians): gets of 8 MiB objects at 306/489 MiB/s (1/8 in flight) where
``pyarrow.fs`` reaches 40/53, at under half its CPU; 64 KiB puts 41 MiB/s (pyarrow
9, boto3 25), 64 KiB ranged reads 53 MiB/s (20, 23), deletes 1,519/s (231,
689), 1,000 keys listed in 19 ms; puts of 8 MiB about equal (97-101 MiB/s).
boto3 gets big objects 10-50% faster but spends 3-7x obstore's CPU on small
requests and brings botocore.  obstore has ranged reads and a conditional
create (``If-None-Match: *``, which SeaweedFS honours; ``pyarrow.fs`` has
none), which a lock or a commit without rename needs, and is one wheel
(needing typing-extensions only).  Buckets it does not make:
:meth:`S3Storage.create` asks ``pyarrow.fs`` (a dependency already).

What object storage gives, and what it costs:

- ``put`` is atomic (a reader sees the old object or the new one) and durable
  when acknowledged; ``sync`` and ``make_prefix`` have nothing to do.
- ``rename`` is a server-side copy then a delete: two requests, the copy's
  time grows with the object's size, and it is not atomic (a crash between
  them leaves both names; a reader may see both meanwhile).  The mtime is not
  kept.  Measured here: 71 ms for 8 MiB, 323 ms for 64 MiB (a put of the
  same bytes: 87 and 713 ms).  The vault's commit is to stop renaming (a
  protocol of immutable, uniquely named objects whose last one is the commit).
- ``touch`` copies the object onto itself (the server sets a new mtime).
- ``map`` reads (nothing to map); ``map`` with spans reads the whole object.

Every reply is untrusted: a body of another length than the size the reply
gives, a range reply other than asked, a listed key outside the prefix or
not a valid name is an error naming it; listings follow every page.  Folder
markers (``p/packs/``, as a console's "create folder", ``pyarrow.fs`` or a
file-system view of the bucket make them; the client lists them without
their ``/``) are no objects: the prefix's own, and those of names under them,
are left out of a listing.  Errors
are one :class:`~cbt.core.errors.CbtIOError` line naming ``s3://bucket/key``.
A request times out after :data:`TIMEOUT` (connecting: :data:`CONNECT_TIMEOUT`)
and is retried 3 times within 120 s.  Not :attr:`Storage.forkable`: obstore's
threads do not survive a fork (workers reopen it by :meth:`S3Storage.spec`).

Locks (:class:`_ObjectLock`): the lock ``name`` is the object ``name``, created
only when missing (``If-None-Match: *``), holding its holder (:class:`LockHolder`
JSON), the handle's random token and its lease.  The holder renews it from a
background thread every ``lease/3`` seconds, each time conditionally on the
ETag it wrote last (``If-Match``; SeaweedFS honours both, as a test against it
shows), so a renewal never overwrites a lock someone else took.  A lock is dead
when its object was last written (the server's ``Last-Modified``) more than its
lease ago, or when its holder is a process of this host that is gone (restic's
rule; and of this boot and pid namespace, :func:`node_id`: host names repeat); a
dead lock is broken by overwriting it conditionally on the ETag read, so of two
breakers one wins, and a holder that renews late finds its lock gone.
The lease is :data:`LEASE` seconds, ``CBT_LOCK_LEASE`` overriding it (tests).
A holder stops before its lease can be broken: :meth:`_ObjectLock.check` (called
right before a commit) fails when the last renewal that succeeded began more
than half a lease ago, leaving half a lease for the commit's one request
(obstore gives up on a request after 120 s of retries; the lease is 300 s).
Clocks: a breaker compares the server's ``Last-Modified`` with its own clock,
so hosts' clocks must agree with the server's to well within the lease.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import functools
import hashlib
import json
import mmap
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

import obstore
from obstore import exceptions as obx
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import PutMode
    from obstore.store import S3Config, S3Credential

from cbt.core.errors import CbtIOError, CbtValueError, untrusted_json
from cbt.repo.storage import (
    Buffers,
    LockBusyError,
    LockHolder,
    ObjectStat,
    Storage,
    StorageLock,
    StorageSpec,
    name_parts,
    parse_location,
)

LEASE = 300.0  # seconds a lock object lives without renewal (CBT_LOCK_LEASE overrides)
MAX_LEASE = 86400.0
# What a breaker writes over a dead lock before it deletes it: of two breakers one wins
# (If-Match).  Its short lease: a breaker killed in between leaves it in the way for
# moments, not a whole lease (one that stalls longer may delete a lock taken meanwhile,
# whose holder then finds it lost at its next renewal and commits nothing).
_BROKEN = b'{"broken": true, "lease": 5}'
LOCK_READ = 4096  # bytes of a lock object read (a holder's record is far smaller)
TIMEOUT = "60s"  # one request, after which obstore retries, then gives up
CONNECT_TIMEOUT = "5s"
STREAM_PART = 8 << 20  # bytes of each part of a streamed upload (S3 wants 5 MiB or more)
_T = TypeVar("_T")
# obstore says "not found" with its own error or with FileNotFoundError
_NOT_FOUND = (obx.NotFoundError, FileNotFoundError)


def aws_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """The standard AWS settings: variables first, then ``AWS_PROFILE``'s files; the
    credentials as one set from either (:func:`_credentials`)."""
    env = dict(os.environ) if env is None else env
    profile = env.get("AWS_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    files: dict[str, str] = {}
    for path, section in (
            (_in_home(env.get("AWS_CONFIG_FILE"), home, ".aws/config"),
             profile if profile == "default" else f"profile {profile}"),
            (_in_home(env.get("AWS_SHARED_CREDENTIALS_FILE"), home, ".aws/credentials"),
             profile)):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise CbtValueError(f"cannot read AWS settings {path}: "
                                f"{str(exc).splitlines()[0]}") from None
        if parser.has_section(section):
            files.update(dict(parser.items(section)))
    if env.get("AWS_PROFILE") and not files:
        raise CbtValueError(f"AWS profile {profile!r} is in neither ~/.aws/config nor "
                            "~/.aws/credentials")
    out = _credentials(env, files, profile)
    for key, var, file_key in (("endpoint", "AWS_ENDPOINT_URL", "endpoint_url"),
                               ("region", "AWS_REGION", "region")):
        value = env.get(var) or (env.get("AWS_DEFAULT_REGION") if key == "region" else None) \
            or files.get(file_key)
        if value:
            out[key] = value
    if "endpoint" in out:
        _check_endpoint(out["endpoint"])
    out.setdefault("region", "us-east-1")
    return out


def _in_home(value: str | None, home: Path, default: str) -> Path:
    """A settings file: the variable's (``~/`` is the home folder, as the AWS tools read
    it), else the default in the home folder."""
    if not value:
        return home / default
    return home / value[2:] if value.startswith("~/") else Path(value)


def _check_endpoint(url: str) -> None:
    """An endpoint is ``http(s)://HOST[:PORT][/PATH]`` (the client panics at the first
    request on anything else)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if (parts is None or not port_ok or parts.scheme not in ("http", "https")
            or not url.isascii() or not parts.hostname or parts.query or parts.fragment
            or parts.username
            or any(c.isspace() or not c.isprintable() or c in "\\\"<>^`{|}" for c in url)):
        raise CbtValueError(f"the S3 endpoint {url!r} (AWS_ENDPOINT_URL, or endpoint_url in "
                            "the AWS profile) is not an http:// or https:// URL of a host "
                            "(in ASCII: an IDN host in its xn-- form)")


_CREDENTIALS = (("access_key_id", "AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                ("secret_access_key", "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                ("session_token", "AWS_SESSION_TOKEN", "aws_session_token"))


def _credentials(env: dict[str, str], files: dict[str, str], profile: str) -> dict[str, str]:
    """One set of credentials, never half of each: the variables' (key id and secret, with
    the token if set) when a key id or secret is set there, else the profile's (key id,
    secret and token from its files); none at all (anonymous) when neither has any.  A
    key id without its secret (or the other way round) is an error naming what is
    missing, as boto3 would not mix them either."""
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        source, col = "the environment", 1
        picked = {key: env.get(var, "") for key, var, _ in _CREDENTIALS}
    else:
        source, col = f"AWS profile {profile!r}", 2
        picked = {key: files.get(file_key, "") for key, _, file_key in _CREDENTIALS}
    out = {key: value for key, value in picked.items() if value}
    if out and not ("access_key_id" in out and "secret_access_key" in out):
        key_id, secret = _CREDENTIALS[0][col], _CREDENTIALS[1][col]
        have, lack = (key_id, secret) if "access_key_id" in out else (secret, key_id)
        raise CbtValueError(f"AWS credentials from {source}: {have} is set without {lack}")
    return out


# obstore reads every AWS_* variable itself (object_store's from_env) and lets a given
# setting override it: these are set here, so that no variable cbt does not take
# changes what a request is (unsigned, S3 Express, no conditional put: no lock)
_PINNED: S3Config = {
    "virtual_hosted_style_request": False, "skip_signature": False, "s3_express": False,
    "conditional_put": "etag", "request_payer": False, "unsigned_payload": False}


def _store(bucket: str, settings: dict[str, str]) -> S3Store:
    """The client: the settings :func:`aws_settings` took and nothing else.  The
    credentials come through a provider, which obstore prefers to any it would find
    itself (a variable's session token beside a profile's keys: half of each; the
    instance metadata service, off this host, when there are none): no credentials at
    all are anonymous (unsigned) requests.  A client that cannot be made (an endpoint
    that is no URL) is one line."""
    endpoint = settings.get("endpoint", "")
    config: S3Config = {**_PINNED, "region": settings["region"]}
    if endpoint:
        config["endpoint"] = endpoint
        config["aws_endpoint_url_s3"] = endpoint  # (else AWS_ENDPOINT_URL_S3 would win)
    provider = None
    if "access_key_id" in settings:
        credential: S3Credential = {
            "access_key_id": settings["access_key_id"],
            "secret_access_key": settings["secret_access_key"],
            "token": settings.get("session_token"), "expires_at": None}
        provider = _Static(credential)
    else:
        config["skip_signature"] = True
    try:
        return S3Store(bucket, config=config, credential_provider=provider,
                       client_options={"timeout": TIMEOUT, "connect_timeout": CONNECT_TIMEOUT,
                                       "allow_http": endpoint.startswith("http://")},
                       retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=120)})
    except (obx.BaseError, ValueError, RuntimeError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise CbtValueError(f"cannot use s3://{bucket} with these AWS settings "
                            f"(endpoint {endpoint or 'the AWS default'}): "
                            f"{_printable(first[:300])}"
                            ) from None


class _Static:
    """A credential provider of one set that never expires."""

    def __init__(self, credential: S3Credential) -> None:
        self._credential = credential

    def __call__(self) -> S3Credential:
        return self._credential


_STATUS = re.compile(r"status code: (\d{3}[^:<]*)")
_S3_CODE = re.compile(r"<Code>([^<]{1,80})</Code>")


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (escape sequences, control characters)
    spelt out: what a server says is untrusted."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _reason(exc: BaseException, endpoint: str | None) -> str:
    """One line saying why a request failed: the HTTP status and S3's error code when the
    server answered (a refused one: check the credentials), the endpoint when it could not
    be reached, else the client's first line; printable (:func:`_printable`)."""
    return _printable(_why(exc, endpoint))


def _why(exc: BaseException, endpoint: str | None) -> str:
    text = str(exc)
    if "error sending request" in text or ("connection" in text.lower() and "status" not in text):
        return (f"cannot reach the S3 endpoint {endpoint or '(the AWS default)'} (retried; "
                "check AWS_ENDPOINT_URL and the network)")
    status, s3_code = _STATUS.search(text), _S3_CODE.search(text)
    if status is not None:
        why = status.group(1).strip() + (f" ({s3_code.group(1)})" if s3_code else "")
        if status.group(1).startswith(("401", "403")):
            why += ": check the AWS credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, " \
                   "AWS_PROFILE)"
        return why
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return first[:300]


def _exists(store: S3Store, key: str) -> bool:
    try:
        obstore.head(store, key)
    except _NOT_FOUND:
        return False
    return True


class S3Storage(Storage):
    """A vault under ``s3://BUCKET/PREFIX`` (see the module doc)."""

    # obstore runs its requests on a runtime of threads a forked child would not have.
    forkable = False
    rename_keeps_mtime = False  # (a copy then a delete: see cbt.repo.trash)
    # (bench/s3_throughput.py: a pack's put or get waits on the server; 8 keep it busy)
    in_flight = 8

    def __init__(self, location: str) -> None:
        self.bucket, self.prefix = parse_location(location)
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._settings = aws_settings()
        self._s = _store(self.bucket, self._settings)

    @classmethod
    def create(cls, location: str, marker: str = "config") -> S3Storage:
        """A storage at an empty location, its bucket made when missing.  Not inside
        another vault (an enclosing prefix holding ``marker``, a vault's config): that
        vault would take the new one's objects for its own (a backup there removes
        ``manifests/...`` no point of its owns)."""
        storage = cls(location)
        storage._make_bucket()
        head = storage._key_prefix("")
        if [k for k in storage._list_keys(head, limit=2) if k + "/" != head]:  # (a marker)
            raise CbtIOError(errno.ENOTEMPTY, f"not empty: {storage.root} (cbt init needs a "
                             "new or empty location)")
        parts = storage.prefix.split("/") if storage.prefix else []
        for n in range(len(parts)):
            outer = "/".join([*parts[:n], marker])
            if storage._call("stat", "", functools.partial(_exists, storage._s, outer)):
                where = f"s3://{storage.bucket}" + "".join(f"/{p}" for p in parts[:n])
                raise CbtIOError(errno.EEXIST, f"{storage.root} is inside the vault {where} "
                                 "(a vault cannot hold another: choose a prefix beside it)")
        return storage

    def _make_bucket(self) -> None:
        """Make the bucket when it is missing (obstore makes none: ``pyarrow.fs`` does).
        A bucket that is there is left alone; any other error is named by the listing
        that follows."""
        if self.missing() is None:
            return
        import pyarrow.fs as pafs

        s = self._settings
        endpoint = s.get("endpoint", "")
        scheme, _, host = endpoint.partition("://")
        try:
            fs = pafs.S3FileSystem(
                access_key=s.get("access_key_id"), secret_key=s.get("secret_access_key"),
                session_token=s.get("session_token"), region=s["region"],
                endpoint_override=host or None, scheme=scheme or "https",
                allow_bucket_creation=True, connect_timeout=5, request_timeout=60)
            fs.create_dir(self.bucket)
        except OSError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "ACCESS_DENIED" in first or "AccessDenied" in first:
                raise CbtIOError(errno.EACCES, f"cannot create bucket s3://{self.bucket}: the "
                                 "credentials do not allow it (make the bucket by hand, or "
                                 "use credentials that may)") from None
            raise CbtIOError(errno.EIO, f"cannot create bucket s3://{self.bucket}: "
                             f"{_printable(first[:300])}") from None

    def spec(self) -> StorageSpec:
        return StorageSpec("s3", self.root)

    def where(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def _key(self, name: str) -> str:
        parts = name_parts(name)
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _key_prefix(self, prefix: str) -> str:
        parts = name_parts(prefix, prefix=True)
        return "".join(f"{p}/" for p in ([self.prefix] if self.prefix else []) + parts)

    def _fail(self, exc: BaseException, verb: str, name: str) -> NoReturn:
        where = self.where(name) if name else self.root
        if isinstance(exc, _NOT_FOUND):
            raise CbtIOError(errno.ENOENT, f"missing from vault: {where}") from None
        text = str(exc)
        if "NoSuchBucket" in text or (verb == "list" and "status code: 404" in text):
            raise CbtIOError(errno.ENOENT, f"cannot {verb} {where}: "
                             f"{self._no_bucket()}") from None
        denied = isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError))
        code = errno.EACCES if denied else errno.EIO
        raise CbtIOError(code, f"cannot {verb} {where}: "
                         f"{_reason(exc, self._settings.get('endpoint'))}") from None

    def _no_bucket(self) -> str:
        return f"bucket s3://{self.bucket} does not exist (cbt init makes it)"

    def missing(self) -> str | None:
        """Why nothing is here at all: the bucket does not exist (else None)."""
        try:
            self._list_keys("", limit=1)
        except CbtIOError as exc:
            return self._no_bucket() if self._no_bucket() in str(exc) else None
        return None

    def clock_offset(self, measure: bool = True) -> float:
        """The server's clock against this host's, measured: a probe object written (and
        removed) here, its mtime taken.  The server gives whole seconds, truncated: an
        mtime ``m`` of a probe written between host times ``t0`` and ``t1`` bounds the
        server's lead from below by ``m - t1``, and an object written later has an mtime
        more than its server time - 1 s: so ``m - t1 - 1``.  (A probe some other process's
        leftovers clean removed meanwhile: measured again.)  Not ``measure`` (nothing
        written: a dry run, maybe with credentials that may only read): -1 s, the whole
        seconds alone."""
        if not measure:
            return -1.0
        for _attempt in range(3):
            probe = f".clock.tmp-{secrets.token_hex(8)}"  # (a killed run's: Vault.leftovers)
            self.put(probe, b"")
            t1 = time.time()
            try:
                m = self.stat(probe).mtime
            except CbtIOError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue
            finally:
                self.delete(probe)
            return m - t1 - 1.0
        raise CbtIOError(errno.EIO, f"cannot read the clock of {self.root}: a probe object "
                         "vanished as it was written, three times")

    def _call(self, verb: str, name: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            self._fail(exc, verb, name)

    def put(self, name: str, data: Buffers) -> None:
        key = self._key(name)
        body = b"".join(data) if isinstance(data, list) else bytes(data)
        self._call("write", name, lambda: obstore.put(self._s, key, body))

    def put_stream(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """In parts (a multipart upload, completed at the end: readers see the whole object
        or none; a failure aborts it).  The chunks are taken here, between writes, not
        inside obstore's runtime: making them may read the vault (a compaction's merge)."""
        key = self._key(name)
        writer = self._call("write", name, lambda: obstore.open_writer(
            self._s, key, buffer_size=STREAM_PART))
        try:
            for chunk in chunks:
                if len(chunk):
                    self._call("write", name, functools.partial(writer.write, chunk))
        except BaseException:
            del writer  # (never closed: the upload is not completed, no object appears)
            raise
        self._call("write", name, writer.close)

    def get(self, name: str) -> bytes:
        key = self._key(name)

        def fetch() -> bytes:
            result = obstore.get(self._s, key)
            size = int(result.meta["size"])
            data = bytes(result.bytes())
            if len(data) != size:
                raise ValueError(f"the server sent {len(data)} bytes of {size}")
            return data
        return self._call("read", name, fetch)

    def map(self, name: str, spans: Sequence[tuple[int, int]] | None = None
            ) -> bytes | mmap.mmap | memoryview:
        """The whole object, read (``spans`` or not), as a view of the buffer obstore
        received it in: no copy of 8 MiB per pack (a restore reads packs this way)."""
        key = self._key(name)

        def fetch() -> memoryview:
            result = obstore.get(self._s, key)
            size = int(result.meta["size"])
            data = memoryview(result.bytes())
            if data.nbytes != size:
                raise ValueError(f"the server sent {data.nbytes} bytes of {size}")
            return data
        return self._call("read", name, fetch)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise CbtValueError(f"invalid range {offset}+{length} of {self.where(name)}")
        key = self._key(name)
        if length == 0:
            self.stat(name)
            return b""
        try:
            data = bytes(obstore.get_range(self._s, key, start=offset, length=length))
        except _NOT_FOUND as exc:
            self._fail(exc, "read", name)
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            size = self.stat(name).size  # a range past the end is refused: fewer bytes
            if offset >= size:
                return b""
            self._fail(exc, "read", name)
        if len(data) > length:
            raise CbtIOError(errno.EIO, f"cannot read {self.where(name)}: the server sent "
                             f"{len(data)} bytes for a range of {length}")
        return data

    def stat(self, name: str) -> ObjectStat:
        key = self._key(name)
        meta = self._call("stat", name, lambda: obstore.head(self._s, key))
        size = meta.get("size")
        if not isinstance(size, int) or size < 0:
            raise CbtIOError(errno.EIO, f"cannot stat {self.where(name)}: invalid size {size!r}")
        modified = meta.get("last_modified")
        return ObjectStat(size, modified.timestamp() if modified is not None else 0.0)

    def exists(self, name: str) -> bool:
        key = self._key(name)
        try:
            obstore.head(self._s, key)
        except _NOT_FOUND:
            return False
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            self._fail(exc, "stat", name)
        return True

    def _list_keys(self, head: str, limit: int | None = None, name: str = "") -> list[str]:
        """The keys under the key prefix ``head``; ``name``: the storage prefix it is, for
        messages (the root when empty)."""
        def run() -> list[str]:
            out: list[str] = []
            for batch in obstore.list(self._s, head or None, chunk_size=1000):
                out.extend(str(m["path"]) for m in batch)
                if limit is not None and len(out) >= limit:
                    break
            return out
        return self._call("list", name.rstrip("/"), run)

    def sizes(self, prefix: str) -> dict[str, int]:
        """One listing, whose entries say each object's size (folder markers, and keys a
        hostile server lists outside the prefix, left out: these are sizes to add up,
        never names to act on)."""
        head, mine = self._key_prefix(prefix), self._key_prefix("")

        def run() -> dict[str, int]:
            return {str(m["path"])[len(mine):]: max(0, int(m["size"]))
                    for batch in obstore.list(self._s, head or None, chunk_size=1000)
                    for m in batch
                    if str(m["path"]).startswith(head) and not str(m["path"]).endswith("/")}
        return self._call("list", prefix.rstrip("/"), run)

    def list(self, prefix: str) -> list[str]:
        head = self._key_prefix(prefix)
        mine = self._key_prefix("")
        names: list[str] = []
        for key in self._list_keys(head, name=prefix):
            if key + "/" == head:
                continue  # the prefix's own folder marker
            if not key.startswith(head):
                raise CbtIOError(errno.EIO, f"cannot list {self.root}/{prefix}: the server "
                                 f"listed {key!r}, outside the prefix")
            name = key[len(mine):]
            try:
                name_parts(name)
                if not name.isprintable():
                    raise CbtValueError(name)
            except CbtValueError:
                raise CbtIOError(errno.EIO, f"cannot list {self.root}/{prefix}: the server "
                                 f"listed an invalid name {key!r}") from None
            names.append(name)
        folders = {n[:i] for n in names for i, c in enumerate(n) if c == "/"}
        return sorted(set(names) - folders)  # (folder markers of the names under them)

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            obstore.delete(self._s, key)
        except _NOT_FOUND:
            pass
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            self._fail(exc, "delete", name)

    def sync(self, prefix: str) -> None:
        name_parts(prefix, prefix=True)  # a delete is durable once acknowledged

    def make_prefix(self, prefix: str) -> None:
        name_parts(prefix, prefix=True)  # a prefix exists by the names under it

    def rename(self, src: str, dst: str) -> None:
        s, d = self._key(src), self._key(dst)
        self._call("rename", src, lambda: obstore.copy(self._s, s, d))
        self.delete(src)

    def touch(self, name: str) -> None:
        key = self._key(name)
        try:
            obstore.copy(self._s, key, key)
        except _NOT_FOUND as exc:
            self._fail(exc, "touch", name)
        except (obx.BaseError, OSError, ValueError, RuntimeError):
            self.put(name, self.get(name))  # a server refusing a copy onto itself

    def lock(self, name: str, remove: bool = False) -> StorageLock:
        name_parts(name)
        return _ObjectLock(self, name)  # (a lock object always goes when released)

    def create_only(self, name: str, data: bytes) -> bool:
        """Create ``name`` when it is missing (``If-None-Match: *``): whether it was made."""
        return self.put_if(name, data, "create") is not None

    def put_if(self, name: str, data: bytes, mode: PutMode) -> str | None:
        """Put ``data`` at ``name`` under a condition (``"create"``: when missing;
        ``{"e_tag": E}``: when its ETag is E): its new ETag, or None when the condition
        failed."""
        key = self._key(name)
        try:
            result = obstore.put(self._s, key, data, mode=mode)
        except (obx.AlreadyExistsError, obx.PreconditionError, *_NOT_FOUND):
            return None
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            self._fail(exc, "write", name)
        return str(result.get("e_tag") or "")

    def read_lock(self, name: str) -> _Seen | None:
        """A lock object as it is now, or None when there is none."""
        key = self._key(name)

        def fetch() -> _Seen:
            result = obstore.get(self._s, key)
            meta = result.meta
            data = bytearray()
            for chunk in result.stream(min_chunk_size=LOCK_READ):  # a huge one: its head
                data += bytes(chunk)
                if len(data) >= LOCK_READ:
                    break
            modified = meta.get("last_modified")
            return _Seen(bytes(data[:LOCK_READ]), str(meta.get("e_tag") or ""),
                         modified.timestamp() if modified is not None else 0.0)
        try:
            return fetch()
        except _NOT_FOUND:
            return None
        except (obx.BaseError, OSError, ValueError, RuntimeError) as exc:
            self._fail(exc, "read", name)


def lease_seconds() -> float:
    """The lease of the locks this process makes: :data:`LEASE`, or ``CBT_LOCK_LEASE``."""
    raw = os.environ.get("CBT_LOCK_LEASE")
    if not raw:
        return LEASE
    try:
        lease = float(raw)
    except ValueError:
        lease = -1.0
    if not 0.0 < lease <= MAX_LEASE:
        raise CbtValueError(f"CBT_LOCK_LEASE={raw!r}: give seconds, above 0 and at most "
                            f"{MAX_LEASE:.0f}")
    return lease


class _Seen(NamedTuple):
    """A lock object as read: its body (the first 4 KiB), ETag and ``Last-Modified``."""

    body: bytes
    etag: str
    modified: float

    def info(self) -> dict[str, Any]:
        try:
            info = untrusted_json(self.body or b"{}")
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def holder(self) -> LockHolder:
        return LockHolder.from_json(self.body)

    def dead(self) -> bool:
        """Its lease ran out (by the server's time of its last write), or its holder is a
        process of this host that is gone."""
        info = self.info()
        lease = info.get("lease")
        if not isinstance(lease, (int, float)) or not 0 < lease <= MAX_LEASE:
            lease = LEASE
        if time.time() - self.modified > lease:
            return True
        pid = info.get("pid")
        return (info.get("host") == socket.gethostname() and info.get("node") == node_id()
                and isinstance(pid, int) and pid > 0 and not _alive(pid))


@functools.cache
def node_id() -> str:
    """Where this process's pids mean something: this boot of this machine and this pid
    namespace (hashed).  Two machines (or containers) may well share a host name, and a
    pid of one says nothing of the other: a lock's pid is checked only where its node is
    this one, else its lease decides."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", Path.read_text),
                       ("/proc/self/ns/pid", lambda p: os.readlink(p))):
        try:
            parts.append(str(read(Path(path))).strip())
        except OSError:
            parts.append("?")
    if "?" in parts:  # cannot tell: a pid is never taken for dead
        return "unknown-" + secrets.token_hex(8)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False  # (a pid too large for any process)
    except OSError:
        return True  # another user's: alive
    return True


class _ObjectLock(StorageLock):
    """A lock object with a lease this handle renews while it holds it (module doc)."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        self._storage = storage
        self._name = name
        self._token = secrets.token_hex(16)
        self._lease = lease_seconds()
        self._holder = LockHolder()
        self._etag: str | None = None  # what this handle wrote last, while it holds it
        self._renewed = 0.0  # monotonic time the last write that succeeded began
        self._lost: str | None = None
        self._count = 0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        info = json.loads(self._holder.to_json())
        self._count += 1
        info.update(token=self._token, lease=self._lease, renewal=self._count, node=node_id(),
                    renewed_ts=time.time())  # (a new body: a new ETag each renewal)
        return json.dumps(info).encode()

    def acquire(self, wait: float | None) -> None:
        from cbt.core.timefmt import utc_now

        deadline = None if wait is None else time.monotonic() + wait
        self._holder = LockHolder(pid=os.getpid(), host=socket.gethostname(),
                                  since=utc_now(), since_ts=time.time())
        while True:
            started = time.monotonic()
            etag = self._storage.put_if(self._name, self._body(), "create")
            seen = None
            if etag is None:
                seen = self._storage.read_lock(self._name)
                if seen is None:
                    continue  # gone meanwhile: create it again
                if seen.dead():  # break it: of two breakers, one wins
                    etag = self._storage.put_if(self._name, self._body(), {"e_tag": seen.etag})
            if etag is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise LockBusyError(self._storage.where(self._name),
                                    seen.holder() if seen is not None else LockHolder())
            time.sleep(0.2)
        self._etag, self._renewed, self._lost = etag, started, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"cbt-lease {self._name}")
        self._thread.start()

    def _write(self) -> None:
        """Renew: rewrite the object if it still is the one this handle wrote."""
        with self._mutex:
            if self._etag is None or self._lost is not None:
                return
            started = time.monotonic()
            etag = self._storage.put_if(self._name, self._body(), {"e_tag": self._etag})
            if etag is None:
                self._lost = "another process took it (its lease had run out)"
                return
            self._etag, self._renewed = etag, started

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            with contextlib.suppress(CbtIOError):  # the server is away: again in lease/3
                self._write()

    def record(self, holder: LockHolder) -> None:
        assert self._etag is not None, "record() before acquire()"
        self._holder = holder
        self._write()
        self.check()

    def check(self) -> None:
        where = self._storage.where(self._name)
        if self._etag is None:
            raise CbtIOError(errno.ENOLCK, f"the lock {where} is not held")
        if self._lost is not None:
            raise CbtIOError(errno.ENOLCK, f"lost the lock {where}: {self._lost}")
        age = time.monotonic() - self._renewed
        if age > self._lease / 2:
            raise CbtIOError(errno.ENOLCK, f"lost the lock {where}: its lease could not be "
                             f"renewed for {age:.0f} s (lease {self._lease:.0f} s)")

    def release(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._mutex:
            etag, self._etag = self._etag, None
        if etag is None or self._lost is not None:
            return
        # remove it if it still is ours: nobody else takes a live lock between the two
        # (a tombstone written first would look like a lock to break, and be taken)
        seen = self._storage.read_lock(self._name)
        if seen is not None and seen.etag == etag:
            self._storage.delete(self._name)

    def holder(self) -> LockHolder | None:
        seen = self._storage.read_lock(self._name)
        if seen is None or seen.dead():
            return None
        return seen.holder()

    def clear_dead(self) -> bool:
        seen = self._storage.read_lock(self._name)
        if seen is None or not seen.dead():
            return False
        if self._storage.put_if(self._name, _BROKEN, {"e_tag": seen.etag}) is None:
            return False  # renewed or broken meanwhile
        self._storage.delete(self._name)
        return True


__all__ = ["LEASE", "S3Storage", "aws_settings", "lease_seconds", "parse_location"]

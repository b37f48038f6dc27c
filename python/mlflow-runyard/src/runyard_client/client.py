"""Runyard's HTTP API over urllib: submit, read, stop, wait for and follow jobs.

Settings not given explicitly come from the same places as the `runyard` CLI's:
- controller: `RUNYARD_CONTROLLER`, else http://127.0.0.1:7900;
- token: `RUNYARD_TOKEN`, else (only for a controller on this machine) the admin token in the
  data dir (`$RUNYARD_DATA_DIR`, else `~/.runyard`) `admin.token`;
- ca: `RUNYARD_CA`, else (only for a controller on this machine) `<data-dir>/tls/ca.crt` when it
  exists; trusted besides the system's roots.
"""

from __future__ import annotations

import codecs
import http.client
import ipaddress
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any, Callable, Dict, Optional

DEFAULT_CONTROLLER = "http://127.0.0.1:7900"
STATUSES = (
    "pending",
    "scheduled",
    "preparing",
    "running",
    "succeeded",
    "failed",
    "stopping",
    "stopped",
    "lost",
)
# `lost` is not finished: the controller places the job again.
FINISHED_STATUSES = frozenset({"succeeded", "failed", "stopped"})

# Seconds one plain request may take.
REQUEST_TIMEOUT = 30.0
# Seconds a log stream may stay silent before it is reopened where it left off (the controller
# sends nothing while a job prints nothing).
STREAM_IDLE_TIMEOUT = 60.0
# Seconds a snapshot upload may wait on one read or write (at least; 64 MiB on a slow link).
UPLOAD_TIMEOUT = 300.0
# How long wait() and follow_logs() keep retrying a controller that cannot be reached or answers
# 5xx (a restart) before giving up.
TRANSIENT_GRACE = 120.0

_ADMIN_TOKEN_FILE = "admin.token"
_CA_FILE = os.path.join("tls", "ca.crt")


class RunyardError(Exception):
    """An API call failed.

    `status` is the HTTP status (None when the controller could not be reached), `message` the
    server's `error` (or the cause), `field` the spec field at fault when the server named one,
    `body` the decoded error body when it was JSON.
    """

    def __init__(
        self,
        message: str,
        status: Optional[int] = None,
        field: Optional[str] = None,
        body: Any = None,
        url: Optional[str] = None,
    ):
        self.message = message
        self.status = status
        self.field = field
        self.body = body
        self.url = url
        super().__init__(message)

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        if self.status is None:
            return f"{self.message}{where}"
        return f"HTTP {self.status}: {self.message}{where}"

    @property
    def transient(self) -> bool:
        """True for failures worth retrying: unreachable controller, 502/503/504."""
        return self.status is None or self.status in (502, 503, 504)


class WaitTimeout(RunyardError, TimeoutError):
    """wait() reached its deadline before the job finished; `job` is the last state seen."""

    def __init__(self, message: str, job: Optional[dict] = None):
        super().__init__(message)
        self.job = job


def _data_dir() -> Optional[str]:
    d = os.environ.get("RUNYARD_DATA_DIR")
    if d:
        return d
    home = os.environ.get("HOME") or os.path.expanduser("~")
    if not home or home == "~":
        return None
    return os.path.join(home, ".runyard")


def _is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _flush_tail(decoder, out) -> None:
    tail = decoder.decode(b"", final=True)
    if tail:
        out.write(tail)
        out.flush()


class Client:
    """A Runyard controller's API.

    Client(controller=None, token=None, ca=None, timeout=30.0)
    """

    def __init__(
        self,
        controller: Optional[str] = None,
        token: Optional[str] = None,
        ca: Optional[str] = None,
        timeout: float = REQUEST_TIMEOUT,
    ):
        url = (controller or os.environ.get("RUNYARD_CONTROLLER") or DEFAULT_CONTROLLER).strip()
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RunyardError(
                f"`{url}` is not a controller URL: give an http:// or https:// base URL "
                "(controller=... or RUNYARD_CONTROLLER)"
            )
        self.controller = url.rstrip("/")
        self.timeout = timeout
        local = _is_loopback(parsed.hostname)
        data_dir = _data_dir() if local else None

        tok = token if token is not None else os.environ.get("RUNYARD_TOKEN")
        if (tok is None or not tok.strip()) and data_dir:
            try:
                with open(os.path.join(data_dir, _ADMIN_TOKEN_FILE)) as f:
                    tok = f.read()
            except OSError:
                tok = None
        self.token = tok.strip() if tok and tok.strip() else None

        ca_file = ca or os.environ.get("RUNYARD_CA") or None
        if ca_file is None and data_dir and os.path.isfile(os.path.join(data_dir, _CA_FILE)):
            ca_file = os.path.join(data_dir, _CA_FILE)
        self.ca = ca_file
        handlers: list = []
        if parsed.scheme == "https":
            ctx = ssl.create_default_context()
            if ca_file:
                try:
                    ctx.load_verify_locations(cafile=ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise RunyardError(
                        f"cannot use the CA file {ca_file}: {e} (give the controller's "
                        "<data-dir>/tls/ca.crt with ca=... or RUNYARD_CA)"
                    ) from None
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        if local:
            # Never send a request for this machine through a proxy.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    # -- plumbing ---------------------------------------------------------------------------

    def _url(self, path: str, query: Optional[Dict[str, Any]] = None) -> str:
        url = self.controller + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        if not job_id or not isinstance(job_id, str):
            raise RunyardError(f"not a job id: {job_id!r}")
        return "/api/v1/jobs/" + urllib.parse.quote(job_id, safe="") + suffix

    def _open(
        self,
        method: str,
        url: str,
        body: Any = None,
        timeout: Optional[float] = None,
        data: Optional[bytes] = None,
        content_type: Optional[str] = None,
    ):
        """Opens one request: `body` is sent as JSON, or `data` as is with `content_type`."""
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = content_type or "application/octet-stream"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise self._http_error(e, url) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RunyardError(
                    f"cannot verify the TLS certificate of the controller at {self.controller} "
                    f"({reason.verify_message or reason}): give its CA with ca=... or RUNYARD_CA "
                    "(the controller keeps it in <data-dir>/tls/ca.crt)",
                    url=url,
                ) from None
            if data is not None and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
                raise self._cut_upload(url, len(data), reason) from None
            raise RunyardError(
                f"cannot connect to the controller at {self.controller} ({reason}): start it "
                "with `runyard up`, or set RUNYARD_CONTROLLER to its URL",
                url=url,
            ) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            if data is not None:
                raise self._cut_upload(url, len(data), e) from None
            raise RunyardError(
                f"the controller at {self.controller} did not answer ({e or type(e).__name__})",
                url=url,
            ) from None
        except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise RunyardError(
                f"the controller at {self.controller} did not answer ({e or type(e).__name__})",
                url=url,
            ) from None

    def _cut_upload(self, url: str, size: int, cause) -> RunyardError:
        # A server refusing a body (413) may answer and close before reading it all; the
        # answer is then lost under the broken connection.
        return RunyardError(
            f"the controller at {self.controller} closed the connection during the upload of "
            f"{size} bytes ({cause}); it may have refused it as too large",
            url=url,
        )

    @staticmethod
    def _http_error(e: urllib.error.HTTPError, url: str) -> RunyardError:
        try:
            raw = e.read()
        except Exception:  # noqa: BLE001 - the body is only a nicety
            raw = b""
        body: Any = None
        message = ""
        field = None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and body.get("error"):
            message = str(body["error"])
            field = body.get("field")
        else:
            message = raw.decode("utf-8", "replace").strip()[:500] or (e.reason or "")
        if e.code == 401 and "RUNYARD_TOKEN" not in message:
            message += " (pass the admin token with token=... or RUNYARD_TOKEN)"
        return RunyardError(message or str(e.reason), status=e.code, field=field, body=body, url=url)

    def request(self, method: str, path: str, body: Any = None, query=None) -> Any:
        """One API call; returns the decoded JSON body (None for an empty one)."""
        url = self._url(path, query)
        with self._open(method, url, body) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RunyardError(
                f"the controller answered something that is not JSON: {raw[:200]!r}",
                status=resp.status,
                url=url,
            ) from None

    # -- snapshots --------------------------------------------------------------------------

    def upload_snapshot(self, tar_bytes, max_size: Optional[int] = None) -> dict:
        """POST /api/v1/snapshots: stores a tar of a project directory (see `snapshot_of`).

        Returns the controller's answer, `{"snapshot": "snapshot:sha256:<hex>", "sha256",
        "size", "files"}`, plus `created`: False when the controller already had it (200), True
        for a new one (201). A job runs it with `"repo": answer["snapshot"]` and no revision.
        An archive over `max_size` (default MAX_SNAPSHOT_BYTES, the controller's default) is
        refused here with SnapshotTooLarge, before uploading; the controller's own limit answers
        RunyardError(status=413). `tar_bytes` may be a Snapshot.
        """
        from runyard_client.snapshot import (
            MAX_SNAPSHOT_BYTES,
            SNAPSHOT_PREFIX,
            Snapshot,
            SnapshotTooLarge,
            too_large_message,
        )

        if isinstance(tar_bytes, Snapshot):
            tar_bytes = tar_bytes.data
        data = bytes(tar_bytes)
        limit = MAX_SNAPSHOT_BYTES if max_size is None else max_size
        if len(data) > limit:
            raise SnapshotTooLarge(too_large_message("the snapshot", len(data), limit), len(data), limit)
        url = self._url("/api/v1/snapshots")
        timeout = max(self.timeout, UPLOAD_TIMEOUT)
        with self._open("POST", url, data=data, content_type="application/x-tar", timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict) or not str(answer.get("snapshot", "")).startswith(SNAPSHOT_PREFIX):
            raise RunyardError(
                f"the controller's answer to a snapshot upload has no snapshot id: {raw[:200]!r}",
                status=status,
                url=url,
            )
        answer["created"] = status == 201
        return answer

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, spec: dict) -> dict:
        """POST /api/v1/jobs: the created job (with its `id`)."""
        return self.request("POST", "/api/v1/jobs", body=spec)

    def job(self, job_id: str) -> dict:
        """GET /api/v1/jobs/{id}."""
        return self.request("GET", self._job_path(job_id))

    def stop(self, job_id: str) -> dict:
        """POST /api/v1/jobs/{id}/stop: the job. A finished job raises RunyardError(status=409)."""
        return self.request("POST", self._job_path(job_id, "/stop"))

    def wait(
        self,
        job_id: str,
        poll: float = 2.0,
        timeout: Optional[float] = None,
        on_change: Optional[Callable[[dict], None]] = None,
    ) -> dict:
        """Polls the job until it is finished (succeeded, failed or stopped) and returns it.

        `timeout` (seconds) bounds the wait: past it WaitTimeout is raised, carrying the last
        state seen. An unreachable controller (or 502/503/504) is retried for up to
        TRANSIENT_GRACE seconds in a row; other errors (404, 401) are raised at once.
        `on_change(job)` is called whenever the status changes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failing_since = None
        last: Optional[dict] = None
        while True:
            job, failing_since = self._job_tolerant(job_id, failing_since)
            if job is not None:
                if on_change and (last is None or last.get("status") != job.get("status")):
                    on_change(job)
                last = job
                if job.get("status") in FINISHED_STATUSES:
                    return job
            pause = poll
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    state = last.get("status") if last else "unknown"
                    raise WaitTimeout(
                        f"job {job_id} is still {state} after {timeout:g}s", job=last
                    )
                pause = min(pause, left)
            time.sleep(pause)

    def follow_logs(
        self,
        job_id: str,
        out: Optional[IO[str]] = None,
        poll: float = 2.0,
        timeout: Optional[float] = None,
    ) -> dict:
        """Writes the job's log to `out` (default sys.stdout) as it is printed, attempt after
        attempt, until the job is finished; returns the finished job.

        A dropped or silent stream is reopened where it left off (by attempt and byte offset),
        so nothing is printed twice. `timeout` (seconds) bounds the whole follow (WaitTimeout).
        """
        out = sys.stdout if out is None else out
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        failing_since = None
        job: Optional[dict] = None

        def check_deadline():
            if deadline is not None and time.monotonic() >= deadline:
                state = job.get("status") if job else "unknown"
                raise WaitTimeout(f"job {job_id} is still {state} after {timeout:g}s", job=job)

        while True:
            check_deadline()
            fetched, failing_since = self._job_tolerant(job_id, failing_since)
            if fetched is None:
                time.sleep(poll)
                continue
            job = fetched
            current = int(job.get("attempt") or 0)
            finished = job.get("status") in FINISHED_STATUSES
            if current == 0:
                # Not started yet: no log to follow.
                if finished:
                    return job
                time.sleep(poll)
                continue
            if attempt == 0:
                attempt = current  # the log of the attempt running now, as the server shows it
            got, complete = self._stream_attempt(job_id, attempt, offset, decoder, out, deadline)
            offset += got
            if complete:
                # The stream ended on its own: this attempt's log is whole, or it moved on.
                job = self._job_or_none(job_id) or job
                current = int(job.get("attempt") or 0)
                if current > attempt:
                    _flush_tail(decoder, out)
                    attempt += 1  # each attempt's log in turn, even one that was short
                    offset = 0
                    decoder = codecs.getincrementaldecoder("utf-8")("replace")
                    continue
                if job.get("status") in FINISHED_STATUSES:
                    _flush_tail(decoder, out)
                    return job
            if got == 0:
                time.sleep(poll)

    def _job_tolerant(self, job_id: str, failing_since: Optional[float]):
        """The job, or None while the controller is away (transient errors) for less than
        TRANSIENT_GRACE seconds in a row (since `failing_since`); with the new `failing_since`."""
        try:
            return self.job(job_id), None
        except RunyardError as e:
            if not e.transient:
                raise
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > TRANSIENT_GRACE:
                raise
            return None, failing_since

    def _job_or_none(self, job_id: str) -> Optional[dict]:
        try:
            return self.job(job_id)
        except RunyardError as e:
            if e.transient:
                return None
            raise

    def _stream_attempt(self, job_id, attempt, offset, decoder, out, deadline):
        """Streams one attempt's log from `offset`; returns (bytes read, ended normally)."""
        query = {"follow": "true", "attempt": str(attempt), "offset": str(offset)}
        url = self._url(self._job_path(job_id, "/logs"), query)
        got = 0
        try:
            resp = self._open("GET", url, timeout=STREAM_IDLE_TIMEOUT)
        except RunyardError as e:
            if e.transient:
                return 0, False
            raise
        with resp:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    return got, False
                try:
                    chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                except (socket.timeout, TimeoutError):
                    return got, False  # silent job: reopen at the offset
                except (http.client.IncompleteRead, ConnectionError, OSError):
                    return got, False  # cut (controller restarting): reopen at the offset
                if not chunk:
                    return got, True
                got += len(chunk)
                text = decoder.decode(chunk)
                if text:
                    out.write(text)
                    out.flush()

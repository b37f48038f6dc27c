"""A fake Runyard controller (standard library only) for the client's and backend's tests.

It records submitted specs, stop requests and uploaded snapshots and serves job states that a test sets. Time never
passes on its own: a job changes only when the test says so, or, for scripted jobs, one step of
the job's `timeline` each time a follower of its log has read everything there is (the moment a
real controller would make a follower wait). So tests synchronise on requests, not on sleeps.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

FINISHED = {"succeeded", "failed", "stopped"}
SPEC_FIELDS = {
    "name", "repo", "revision", "script", "args", "entry_point", "parameters", "mlflow",
    "requirements", "requirements_file", "env", "compute", "timeout", "retries", "stop_grace",
    "memory", "secrets", "port", "model_from",
}


class FakeRunyard:
    def __init__(self, token: str = "t0ken"):
        self.token = token
        self.lock = threading.Condition()
        self.jobs: Dict[str, dict] = {}
        self.specs: List[dict] = []
        self.stops: List[str] = []
        self.requests: List[str] = []
        self.logs: Dict[str, Dict[int, bytes]] = {}
        self.timelines: Dict[str, List[dict]] = {}
        # Applied to each new job: {"job": {...fields...}, "logs": {attempt: bytes},
        # "timeline": [{...fields..., "log": (attempt, bytes)}]}
        self.next_scenario: Optional[dict] = None
        # Log streams end after this many bytes (as a controller restart would cut them).
        self.cut_streams_after: Optional[int] = None
        # After a stop, the job is `stopping` until this many more GETs of it, then `stopped`.
        self.stop_after_gets = 1
        self._stop_countdown: Dict[str, int] = {}
        # Uploaded snapshots: sha256 hex -> the tar's bytes; each upload's (sha256, status).
        self.snapshots: Dict[str, bytes] = {}
        self.uploads: List[tuple] = []
        # The controller's size limit, and whether a body over it is refused before it is read
        # (the answer then races the client's sending).
        self.snapshot_limit = 64 * 1024 * 1024
        self.refuse_unread = False
        self._n = 0
        self.closed = False
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeRunyard":
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- what tests drive -------------------------------------------------------------------

    def set(self, job_id: str, **fields) -> dict:
        with self.lock:
            self.jobs[job_id].update(fields)
            self.lock.notify_all()
            return dict(self.jobs[job_id])

    def add_log(self, job_id: str, attempt: int, data: bytes) -> None:
        with self.lock:
            per = self.logs.setdefault(job_id, {})
            per[attempt] = per.get(attempt, b"") + data
            self.lock.notify_all()

    def last_spec(self) -> dict:
        with self.lock:
            return self.specs[-1]

    def only_job_id(self) -> str:
        with self.lock:
            assert len(self.jobs) >= 1, "no job was submitted"
            return sorted(self.jobs)[-1]

    # -- behaviour ----------------------------------------------------------------------------

    def _create(self, spec: dict) -> dict:
        with self.lock:
            self._n += 1
            job_id = f"j{self._n:06d}"
            job = {
                "id": job_id,
                "name": spec.get("name") or spec.get("entry_point") or "job",
                "spec": spec,
                "status": "pending",
                "attempt": 0,
                "agent": None,
                "commit": None,
                "exit_code": None,
                "reason": None,
                "failure": None,
            }
            scenario, self.next_scenario = self.next_scenario, None
            if scenario:
                job.update(scenario.get("job", {}))
                for attempt, data in scenario.get("logs", {}).items():
                    self.logs.setdefault(job_id, {})[int(attempt)] = data
                self.timelines[job_id] = list(scenario.get("timeline", []))
            self.jobs[job_id] = job
            self.specs.append(spec)
            return dict(job)

    def _step(self, job_id: str) -> bool:
        """Applies the next timeline step of the job (lock held); False when there is none."""
        steps = self.timelines.get(job_id)
        if not steps:
            return False
        step = dict(steps.pop(0))
        log = step.pop("log", None)
        if log is not None:
            attempt, data = log
            per = self.logs.setdefault(job_id, {})
            per[attempt] = per.get(attempt, b"") + data
        self.jobs[job_id].update(step)
        self.lock.notify_all()
        return True

    def _get(self, job_id: str) -> Optional[dict]:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            left = self._stop_countdown.get(job_id)
            if left is not None:
                if left <= 0:
                    job.update(status="stopped", reason="stopped by the user", failure="stopped")
                    del self._stop_countdown[job_id]
                else:
                    self._stop_countdown[job_id] = left - 1
            return dict(job)

    def _stop(self, job_id: str):
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return 404, {"error": f"no job `{job_id}`", "field": None}
            self.stops.append(job_id)
            if job["status"] in FINISHED:
                return 409, {"error": f"job `{job_id}` is already {job['status']}", "field": None}
            job["status"] = "stopping"
            self._stop_countdown[job_id] = self.stop_after_gets
            self.timelines.pop(job_id, None)
            self.lock.notify_all()
            return 200, dict(job)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeRunyard
    protocol_version = "HTTP/1.0"  # every response ends with the connection: streams need no chunking

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, body) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, field=None) -> None:
        self._json(status, {"error": message, "field": field})

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._error(401, "missing or wrong bearer token")
            return False
        return True

    def _route(self):
        parsed = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in parsed.path.split("/") if p]
        return parts, urllib.parse.parse_qs(parsed.query)

    def do_POST(self):
        fake = self.fake
        fake.requests.append(f"POST {self.path}")
        if not self._authorized():
            return
        parts, _ = self._route()
        if parts == ["api", "v1", "snapshots"]:
            return self._snapshot()
        if parts == ["api", "v1", "jobs"]:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                spec = json.loads(self.rfile.read(length))
            except ValueError:
                return self._error(400, "the body is not JSON")
            if not isinstance(spec, dict):
                return self._error(400, "the body is not a JSON object")
            unknown = sorted(set(spec) - SPEC_FIELDS)
            if unknown:
                return self._error(400, f"unknown field `{unknown[0]}`", unknown[0])
            if spec.get("compute") not in (None, "cpu-small", "gpu") and not str(
                spec.get("compute")
            ).startswith("gpu:"):
                return self._error(
                    400, f"unknown compute `{spec['compute']}`: use `cpu-small`, `gpu` or `gpu:N`",
                    "compute",
                )
            m = spec.get("mlflow") or {}
            if m.get("run_id") and (m.get("experiment_id") or m.get("experiment_name")):
                return self._error(
                    400,
                    "an existing run already has its experiment: drop experiment_id and experiment_name",
                    "mlflow.run_id",
                )
            return self._json(201, fake._create(spec))
        if len(parts) == 5 and parts[:3] == ["api", "v1", "jobs"] and parts[4] == "stop":
            status, body = fake._stop(parts[3])
            return self._json(status, body)
        self._error(404, "no such route")

    def _snapshot(self):
        fake = self.fake
        if self.headers.get("Content-Type") != "application/x-tar":
            return self._error(415, "a snapshot is sent as Content-Type: application/x-tar")
        length = int(self.headers.get("Content-Length") or 0)
        limit = fake.snapshot_limit
        if length > limit and fake.refuse_unread:
            self.close_connection = True
            return self._error(413, f"the snapshot is {length} bytes, over the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) > limit:
            return self._error(413, f"the snapshot is {len(body)} bytes, over the limit of {limit} bytes")
        if not body or len(body) % 512:
            return self._error(400, "the archive is not a tar (its size is not a multiple of 512)")
        digest = hashlib.sha256(body).hexdigest()
        with fake.lock:
            status = 200 if digest in fake.snapshots else 201
            fake.snapshots[digest] = body
            fake.uploads.append((digest, status))
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            files = sum(1 for m in tar.getmembers() if not m.isdir())
        return self._json(status, {
            "snapshot": f"snapshot:sha256:{digest}", "sha256": digest, "size": len(body), "files": files,
        })

    def do_GET(self):
        fake = self.fake
        fake.requests.append(f"GET {self.path}")
        if not self._authorized():
            return
        parts, query = self._route()
        if len(parts) == 4 and parts[:3] == ["api", "v1", "jobs"]:
            job = fake._get(parts[3])
            if job is None:
                return self._error(404, f"no job `{parts[3]}`")
            return self._json(200, job)
        if len(parts) == 5 and parts[:3] == ["api", "v1", "jobs"] and parts[4] == "logs":
            return self._logs(parts[3], query)
        self._error(404, "no such route")

    def _logs(self, job_id: str, query) -> None:
        fake = self.fake
        with fake.lock:
            job = fake.jobs.get(job_id)
            if job is None:
                return self._error(404, f"no job `{job_id}`")
            follow = query.get("follow", ["false"])[0] in ("true", "1", "")
            attempt = int(query.get("attempt", [job["attempt"]])[0])
            if attempt < 1 or attempt > job["attempt"]:
                return self._error(400, f"attempt: `{attempt}` is not an attempt of this job", "attempt")
            offset = int(query.get("offset", ["0"])[0])
        # Chunked, as the controller streams: a cut stream lacks the final chunk.
        self.protocol_version = "HTTP/1.1"
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.send_header("x-runyard-attempt", str(attempt))
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        sent = 0
        while True:
            with fake.lock:
                job = fake.jobs[job_id]
                over = job["status"] in FINISHED or job["attempt"] != attempt
                data = fake.logs.get(job_id, {}).get(attempt, b"")[offset:]
                cut = fake.cut_streams_after
                if cut is not None:
                    data = data[: max(cut - sent, 0)]
            if data:
                chunk(data)
                offset += len(data)
                sent += len(data)
            if cut is not None and sent >= cut:
                return  # cut without the final chunk: the client must reopen at its offset
            if not follow or over:
                self.wfile.write(b"0\r\n\r\n")
                return
            with fake.lock:
                if fake.closed:
                    return
                # Everything is sent and the job goes on: time passes.
                if not fake._step(job_id):
                    fake.lock.wait(timeout=0.5)

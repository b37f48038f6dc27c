"""The `runyard` MLflow project backend.

MLflow (mlflow/projects/backend/loader.py) loads the `mlflow.project_backend` entry point named
`runyard`, calls the loaded object with no arguments, and calls `run(...)` on the result. For
a plugin backend MLflow neither fetches the project nor creates a run: this backend creates the
MLflow run (with the tags MLflow's own project runs carry), submits a Runyard job that runs the
project's entry point in that run, and returns a SubmittedRun tracking the job. Runyard's
controller then owns the run: it tags it with the job, logs the entry point's parameters, and
sets the run FINISHED / FAILED / KILLED when the job ends.

A local project directory is sent to Runyard as a snapshot (runyard_client.snapshot_of: a
deterministic tar of the directory's files, uploaded to `POST /api/v1/snapshots`); the job then
runs `repo: snapshot:sha256:<hex>`. See resolve_project_source for what counts as local.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from mlflow.entities import RunStatus
from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun

from runyard_client import FINISHED_STATUSES, Client, RunyardError
from runyard_client.client import _is_loopback
from runyard_client.snapshot import (
    Snapshot,
    SnapshotError,
    git_origin_url,
    human_size,
    is_git_repository_dir,
    snapshot_of,
)

# A child of MLflow's own logger, so that `mlflow run` shows these lines the way it shows its
# own (MLflow configures only the `mlflow` logger tree).
_logger = logging.getLogger("mlflow.projects.runyard")

BACKEND_NAME = "runyard"

# Keys `mlflow.projects.run` adds to every backend_config (mlflow/projects/__init__.py, _run()),
# plus the local backend's run id key; a plugin ignores them.
try:  # the names as MLflow spells them, where it exposes them
    from mlflow.projects.utils import (
        MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG,
        PROJECT_BUILD_IMAGE,
        PROJECT_DOCKER_ARGS,
        PROJECT_DOCKER_AUTH,
        PROJECT_ENV_MANAGER,
        PROJECT_STORAGE_DIR,
        PROJECT_SYNCHRONOUS,
    )

    MLFLOW_KEYS = frozenset(
        {
            MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG,
            PROJECT_BUILD_IMAGE,
            PROJECT_DOCKER_ARGS,
            PROJECT_DOCKER_AUTH,
            PROJECT_ENV_MANAGER,
            PROJECT_STORAGE_DIR,
            PROJECT_SYNCHRONOUS,
        }
    )
except ImportError:  # pragma: no cover - older or newer MLflow
    MLFLOW_KEYS = frozenset()
MLFLOW_KEYS = MLFLOW_KEYS | {
    "ENV_MANAGER",
    "SYNCHRONOUS",
    "DOCKER_ARGS",
    "STORAGE_DIR",
    "build_image",
    "docker_auth",
    "_mlflow_local_backend_run_id",
}

# The Runyard keys of a backend config, with the type each must have.
RUNYARD_KEYS: Dict[str, Any] = {
    "controller": str,
    "token": str,
    "ca": str,
    "compute": str,
    "requirements": list,
    "timeout": (str, int, float),
    "retries": int,
    "run_id": str,
    "follow": bool,
    "name": str,
    "env": dict,
}

# MLflow's tag keys (mlflow/utils/mlflow_tags.py), spelled out so that a rename shows in tests.
TAG_USER = "mlflow.user"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
TAG_GIT_REPO_URL = "mlflow.source.git.repoURL"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PROJECT_ENV = "mlflow.project.env"
TAG_PROJECT_BACKEND = "mlflow.project.backend"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
# Runyard's own tags of a run made from a local directory.
TAG_SNAPSHOT = "runyard.snapshot"
TAG_SNAPSHOT_DIRTY = "runyard.snapshot.dirty"
# Runyard's agent builds a job's Python environment with uv.
PROJECT_ENV = "uv"

_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:(?!//)")

STATUS_MAP = {
    "pending": RunStatus.SCHEDULED,
    "scheduled": RunStatus.SCHEDULED,
    "preparing": RunStatus.SCHEDULED,
    "lost": RunStatus.SCHEDULED,
    "running": RunStatus.RUNNING,
    "stopping": RunStatus.RUNNING,
    "succeeded": RunStatus.FINISHED,
    "failed": RunStatus.FAILED,
    "stopped": RunStatus.KILLED,
}

# Seconds between two looks at a job (wait, cancel, follow's start).
POLL_SECONDS = 2.0


def parse_backend_config(backend_config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Splits a backend config into (Runyard keys, MLflow's own keys).

    `mlflow run --backend-config` passes a JSON string already parsed, and `mlflow.projects.run`
    loads a path ending in `.json`, so a dict is what normally arrives; a path to a JSON file is
    read here too. Unknown keys (typos) and keys of the wrong type raise ExecutionException.
    """
    if backend_config is None:
        raw: Dict[str, Any] = {}
    elif isinstance(backend_config, dict):
        raw = dict(backend_config)
    elif isinstance(backend_config, (str, os.PathLike)):
        path = os.fspath(backend_config)
        try:
            with open(path) as f:
                raw = json.load(f)
        except OSError as e:
            raise ExecutionException(f"cannot read the Runyard backend config {path}: {e}")
        except ValueError as e:
            raise ExecutionException(f"the Runyard backend config {path} is not JSON: {e}")
        if not isinstance(raw, dict):
            raise ExecutionException(f"the Runyard backend config {path} is not a JSON object")
    else:
        raise ExecutionException(
            f"the Runyard backend config must be a dict or a JSON file, not {type(backend_config).__name__}"
        )
    mine = {k: v for k, v in raw.items() if k not in MLFLOW_KEYS}
    theirs = {k: v for k, v in raw.items() if k in MLFLOW_KEYS}
    unknown = sorted(k for k in mine if k not in RUNYARD_KEYS)
    if unknown:
        raise ExecutionException(
            "unknown Runyard backend config key(s): "
            + ", ".join(repr(k) for k in unknown)
            + "; known keys: "
            + ", ".join(sorted(RUNYARD_KEYS))
        )
    for key, value in list(mine.items()):
        if value is None:
            del mine[key]  # null = not given
            continue
        want = RUNYARD_KEYS[key]
        # bool is an int in Python: `retries: true` is a mistake, `follow: 1` too.
        if isinstance(value, bool) and want is not bool:
            ok = False
        elif want is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, want)
        if not ok:
            raise ExecutionException(
                f"Runyard backend config `{key}`: {value!r} is not {_type_words(want)}"
            )
    if "requirements" in mine and not all(isinstance(r, str) for r in mine["requirements"]):
        raise ExecutionException(
            "Runyard backend config `requirements`: a list of pip requirement strings"
        )
    if "env" in mine:
        bad = [k for k, v in mine["env"].items() if not isinstance(v, str)]
        if bad:
            raise ExecutionException(
                f"Runyard backend config `env`: values must be strings ({', '.join(bad)})"
            )
    if "retries" in mine and mine["retries"] < 0:
        raise ExecutionException("Runyard backend config `retries`: a count, 0 or more")
    return mine, theirs


def _type_words(want) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "an object"}
    if isinstance(want, tuple):
        return " or ".join(names[t] for t in want)
    return names[want]


def split_project_uri(project_uri: str) -> Tuple[str, str]:
    """(repository URL, subdirectory) of an MLflow project URI (`repo#subdir`)."""
    uri = project_uri.strip("'\"")
    if "#" in uri:
        repo, sub = uri.split("#", 1)
        return repo, sub
    return uri, ""


def is_git_uri(uri: str) -> bool:
    """Whether Runyard can clone `uri` itself: a URL Runyard accepts or scp-like `user@host:path`."""
    m = _URL_SCHEME.match(uri)
    if m:
        return m.group(1).lower() in ("https", "http", "ssh", "git", "file")
    return bool(_SCP_LIKE.match(uri))


def file_uri_path(uri: str) -> str:
    """The local path of a file:// URI (`file:///abs`, `file://host/path` as MLflow reads it)."""
    parts = urllib.parse.urlsplit(uri)
    path = urllib.request.url2pathname(parts.path)
    if parts.netloc and parts.netloc != "localhost":
        path = parts.netloc + path  # MLflow joins them too: file://rel/dir is rel/dir
    return path


@dataclass(frozen=True)
class ProjectSource:
    """Where a job's project comes from: a git repository Runyard clones (`repo`, `revision`),
    or a local directory sent as a snapshot (`local_dir`, absolute)."""

    repo: Optional[str] = None
    revision: str = ""
    local_dir: Optional[str] = None


def resolve_project_source(project_uri: str, version: Optional[str]) -> ProjectSource:
    """What `project_uri` (as MLflow hands it over: unchanged from `mlflow run URI` or
    `mlflow.projects.run(uri)`) names.

    - A local directory: a path (`.`, `dir`, `/abs/dir`) or a `file://` URI naming an existing
      directory that is a working tree (a git checkout or a plain directory). Sent as a
      snapshot; a `version` is an error, as MLflow says for non-git URIs.
    - A git repository: an https/http/ssh/git URL, scp-like `user@host:path`, a `file://` URI of
      a path that is not a local working tree (a bare repository, `.git` directory, or a path
      that only exists where Runyard runs), or a plain path to a bare repository (made a
      `file://` URL). Runyard clones it at `version`.
    ZIP URIs and `#subdirectory` are refused.
    """
    repo, sub = split_project_uri(project_uri)
    if repo.lower().endswith(".zip"):
        raise ExecutionException(
            f"`{project_uri}`: ZIP project URIs are not supported by the Runyard backend; "
            "give a git repository URI or a local directory"
        )
    scheme = _URL_SCHEME.match(repo)
    local = None
    if scheme and scheme.group(1).lower() == "file":
        path = file_uri_path(repo)
        if os.path.isdir(path) and not is_git_repository_dir(path):
            local = os.path.abspath(path)
    elif not scheme and os.path.exists(repo):
        if not os.path.isdir(repo):
            raise ExecutionException(
                f"`{project_uri}` is a file: give the project's directory (with its MLproject) "
                "or a git repository URI"
            )
        if is_git_repository_dir(repo):
            repo = "file://" + os.path.abspath(repo)  # a bare repository: Runyard clones it
        else:
            local = os.path.abspath(repo)
    elif not is_git_uri(repo):
        if scheme:
            raise ExecutionException(
                f"`{project_uri}`: Runyard clones git repositories over https, http, ssh, git or "
                "file URLs (or scp-like user@host:path), and runs local directories"
            )
        raise ExecutionException(
            f"`{project_uri}`: no such directory, and not a git repository URI (https://, "
            "ssh://, git@host:path, file://)"
        )
    if local is not None:
        if sub:
            raise ExecutionException(
                f"`{project_uri}`: `#{sub}` (a project in a subdirectory) is not supported by the "
                f"Runyard backend; run the subdirectory itself: {os.path.join(local, sub)}"
            )
        if version:
            raise ExecutionException(
                f"Setting a version is only supported for Git project URIs: `{project_uri}` is a "
                "local directory, sent to Runyard as a snapshot of its files as they are. Run "
                "the repository's URI with the version, or check the version out and run the "
                "directory"
            )
        return ProjectSource(local_dir=local)
    if sub:
        raise ExecutionException(
            f"`{project_uri}`: projects in a subdirectory (`#{sub}`) are not supported by the "
            "Runyard backend yet; put the MLproject at the repository's root"
        )
    return ProjectSource(repo=repo, revision=version or "")


def check_tracking_uri(tracking_uri: Optional[str]) -> str:
    """Runyard's controller logs to MLflow over its REST API: the tracking URI is http(s)."""
    parsed = urllib.parse.urlsplit(tracking_uri or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ExecutionException(
            f"the MLflow tracking URI is `{tracking_uri}`: the Runyard backend needs an MLflow "
            "tracking server that Runyard's controller and agents can reach over http(s). Start "
            "one (`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db`) "
            "and set MLFLOW_TRACKING_URI=http://HOST:5000"
        )
    return tracking_uri


def _user() -> str:
    try:
        from mlflow.tracking.context.default_context import _get_user

        return _get_user()
    except Exception:  # noqa: BLE001 - the tag is informative
        try:
            return getpass.getuser()
        except Exception:  # noqa: BLE001
            return "unknown"


def project_tags(project_uri: str, repo: str, entry_point: str, version: Optional[str]) -> Dict[str, str]:
    """The tags of an MLflow project run from a git repository (as mlflow/projects/utils.py
    _create_run sets them)."""
    tags = _common_tags(project_uri, entry_point)
    tags[TAG_GIT_REPO_URL] = repo
    # A branch or tag name cannot be told apart without the repository: only a full commit id
    # becomes a tag here (the job's resolved commit is added once Runyard reports it).
    if version and _FULL_SHA.match(version.lower()):
        tags[TAG_GIT_COMMIT] = version.lower()
    return tags


def local_project_tags(snap: Snapshot, snapshot_id: str, entry_point: str) -> Dict[str, str]:
    """The tags of a run from a local directory: the directory as the source, HEAD and the
    checkout's origin URL when it is a git checkout (as MLflow's local runs have them), the
    snapshot, and (git only) whether the snapshot differs from HEAD."""
    tags = _common_tags(snap.path, entry_point)
    tags[TAG_SNAPSHOT] = snapshot_id
    if snap.commit:
        tags[TAG_GIT_COMMIT] = snap.commit
    if snap.dirty is not None:
        tags[TAG_SNAPSHOT_DIRTY] = "true" if snap.dirty else "false"
    if snap.git_root:
        origin = git_origin_url(snap.git_root)
        if origin:
            tags[TAG_GIT_REPO_URL] = origin
    return tags


def _common_tags(source_name: str, entry_point: str) -> Dict[str, str]:
    tags = {
        TAG_USER: _user(),
        TAG_SOURCE_NAME: source_name,
        TAG_SOURCE_TYPE: "PROJECT",
        TAG_ENTRY_POINT: entry_point,
        TAG_PROJECT_ENV: PROJECT_ENV,
        TAG_PROJECT_BACKEND: BACKEND_NAME,
    }
    try:
        from mlflow.tracking import fluent

        parent = fluent.active_run()
        if parent is not None:
            tags[TAG_PARENT_RUN_ID] = parent.info.run_id
    except Exception:  # noqa: BLE001
        pass
    return tags


class RunyardSubmittedRun(SubmittedRun):
    """A Runyard job running an MLflow project in the MLflow run `run_id`."""

    def __init__(
        self, client: Client, job: dict, run_id: str, mlflow_client=None, poll=None, tag_commit=True
    ):
        super().__init__()
        self._client = client
        self._job = job
        self._run_id = run_id
        self._mlflow = mlflow_client
        self.poll = POLL_SECONDS if poll is None else poll
        # A snapshot's job has no commit of its own to record (the run has HEAD's already).
        self._commit_tagged = not tag_commit

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def job_id(self) -> str:
        return self._job["id"]

    @property
    def job(self) -> dict:
        """The job as last seen."""
        return self._job

    def _seen(self, job: dict) -> dict:
        self._job = job
        self._tag_commit(job)
        return job

    def _tag_commit(self, job: dict) -> None:
        """Records the commit Runyard checked out on the run, as MLflow's own runs have it."""
        commit = job.get("commit")
        if self._commit_tagged or not commit or self._mlflow is None:
            return
        self._commit_tagged = True
        try:
            run = self._mlflow.get_run(self._run_id)
            if TAG_GIT_COMMIT not in run.data.tags:
                self._mlflow.set_tag(self._run_id, TAG_GIT_COMMIT, commit)
        except Exception as e:  # noqa: BLE001 - a tag is not worth failing the run for
            _logger.debug("cannot tag run %s with commit %s: %s", self._run_id, commit, e)

    def refresh(self) -> dict:
        return self._seen(self._client.job(self.job_id))

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the job is finished; True iff it succeeded."""
        job = self._client.wait(self.job_id, poll=self.poll, timeout=timeout, on_change=self._seen)
        return self._seen(job).get("status") == "succeeded"

    def get_status(self) -> str:
        """The job's status as an MLflow run status name (RunStatus.to_string)."""
        status = self.refresh().get("status")
        return RunStatus.to_string(STATUS_MAP.get(status, RunStatus.RUNNING))

    def cancel(self, timeout: Optional[float] = None) -> None:
        """Stops the job and waits until it is finished; an already finished job is fine."""
        try:
            self._seen(self._client.stop(self.job_id))
        except RunyardError as e:
            if e.status != 409:
                raise ExecutionException(f"cannot stop Runyard job {self.job_id}: {e}") from None
        if self._job.get("status") not in FINISHED_STATUSES:
            self.wait(timeout=timeout)

    def follow(self, out=None) -> dict:
        """Streams the job's log to `out` (stdout) until the job is finished; returns the job."""
        job = self._client.follow_logs(self.job_id, out=out, poll=self.poll)
        return self._seen(job)

    def __repr__(self) -> str:
        return f"RunyardSubmittedRun(job_id={self.job_id!r}, run_id={self._run_id!r})"


class RunyardBackend(AbstractBackend):
    """Runs MLflow projects from git repositories or local directories as Runyard jobs."""

    def run(
        self,
        project_uri,
        entry_point,
        params,
        version,
        backend_config,
        tracking_uri,
        experiment_id,
    ):
        cfg, mlflow_keys = parse_backend_config(backend_config)
        _note_ignored(mlflow_keys)
        source = resolve_project_source(project_uri, version)
        tracking_uri = check_tracking_uri(tracking_uri)
        entry_point = entry_point or "main"
        try:
            client = Client(controller=cfg.get("controller"), token=cfg.get("token"), ca=cfg.get("ca"))
        except RunyardError as e:
            raise ExecutionException(str(e)) from None
        _warn_unreachable_tracking(client.controller, tracking_uri)

        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=tracking_uri)
        if source.local_dir is not None:
            snap, repo = upload_local_project(client, source.local_dir)
            revision = None
            tags = local_project_tags(snap, repo, entry_point)
        else:
            repo, revision = source.repo, source.revision
            tags = project_tags(project_uri, repo, entry_point, version)
        run_id, created = self._create_or_reuse_run(mlflow_client, cfg.get("run_id"), experiment_id, tags)

        spec = build_spec(cfg, repo, revision, entry_point, params, tracking_uri, run_id)
        try:
            job = client.submit(spec)
        except RunyardError as e:
            if created:
                _quietly(mlflow_client.set_terminated, run_id, "FAILED")
            where = f" ({e.field})" if e.field else ""
            raise ExecutionException(
                f"Runyard did not take the job{where}: {e.message}"
                + ("" if e.status else f" [{client.controller}]")
            ) from None
        submitted = RunyardSubmittedRun(
            client, job, run_id, mlflow_client, tag_commit=source.local_dir is None
        )
        _logger.info(
            "=== Submitted Runyard job %s for MLflow run %s (experiment %s) ===",
            submitted.job_id,
            run_id,
            experiment_id,
        )
        if not cfg.get("follow"):
            return submitted
        try:
            job = submitted.follow(out=sys.stdout)
        except KeyboardInterrupt:
            _logger.error("=== Interrupted: stopping Runyard job %s ===", submitted.job_id)
            submitted.cancel()
            raise
        except RunyardError as e:
            raise ExecutionException(f"following Runyard job {submitted.job_id}: {e}") from None
        status = job.get("status")
        if status != "succeeded":
            reason = job.get("reason") or job.get("failure") or ""
            exit_code = job.get("exit_code")
            detail = f": {reason}" if reason else ""
            if exit_code is not None and str(exit_code) not in str(reason):
                detail += f" (exit code {exit_code})"
            raise ExecutionException(
                f"Runyard job {submitted.job_id} (MLflow run {run_id}) {status}{detail}"
            )
        _logger.info("=== Runyard job %s succeeded (MLflow run %s) ===", submitted.job_id, run_id)
        return submitted

    @staticmethod
    def _create_or_reuse_run(mlflow_client, run_id, experiment_id, tags) -> Tuple[str, bool]:
        """(run id, created): a new run in `experiment_id`, or the given one."""
        if run_id:
            try:
                run = mlflow_client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 - MlflowException, or a connection error
                raise ExecutionException(f"cannot use MLflow run {run_id}: {e}") from None
            missing = {k: v for k, v in tags.items() if k not in run.data.tags}
            # The backend tag always: this run now runs on Runyard.
            missing[TAG_PROJECT_BACKEND] = BACKEND_NAME
            for k, v in missing.items():
                mlflow_client.set_tag(run_id, k, v)
            return run_id, False
        try:
            run = mlflow_client.create_run(experiment_id=experiment_id, tags=tags)
        except Exception as e:  # noqa: BLE001
            raise ExecutionException(f"cannot create an MLflow run in experiment {experiment_id}: {e}") from None
        return run.info.run_id, True


def upload_local_project(client: Client, path: str) -> Tuple[Snapshot, str]:
    """Snapshots the directory `path` and uploads it: (the snapshot, its id on the controller)."""
    try:
        snap = snapshot_of(path)
    except SnapshotError as e:
        raise ExecutionException(f"cannot send the project directory {path} to Runyard: {e}") from None
    if snap.skipped:
        _logger.warning(
            "Left out of the snapshot (neither files, directories nor symlinks): %s",
            ", ".join(snap.skipped),
        )
    try:
        answer = client.upload_snapshot(snap.data)
    except RunyardError as e:
        raise ExecutionException(
            f"Runyard did not take the snapshot of {path} ({snap.files} files, "
            f"{human_size(snap.size)}): {e.message}"
            + ("" if e.status else f" [{client.controller}]")
        ) from None
    state = ""
    if snap.commit:
        state = f", {'changes on ' if snap.dirty else ''}commit {snap.commit[:12]}"
    _logger.info(
        "=== Sent %s to Runyard as %s (%d files, %s%s%s) ===",
        path,
        answer["snapshot"],
        snap.files,
        human_size(snap.size),
        state,
        "" if answer.get("created", True) else ", already there",
    )
    return snap, answer["snapshot"]


def build_spec(cfg, repo, revision, entry_point, params, tracking_uri, run_id) -> Dict[str, Any]:
    """The Runyard job spec running `entry_point` of `repo` in MLflow run `run_id`.

    `revision` None (a snapshot: `repo` is its id) leaves `revision` out. The run already has
    its experiment, so `mlflow` carries no experiment (Runyard refuses run_id together with
    experiment_id/experiment_name).
    """
    spec: Dict[str, Any] = {"repo": repo}
    if revision is not None:
        spec["revision"] = revision
    spec.update({
        "entry_point": entry_point,
        "parameters": {str(k): _param_text(v) for k, v in (params or {}).items()},
        "mlflow": {"tracking_uri": tracking_uri, "run_id": run_id},
    })
    for key in ("name", "compute", "requirements", "timeout", "retries", "env"):
        if key in cfg:
            spec[key] = cfg[key]
    return spec


def _param_text(v) -> str:
    # MLflow's CLI gives strings; the Python API may give numbers. Types are checked by Runyard
    # against the MLproject, as MLflow would.
    return v if isinstance(v, str) else str(v)


def _note_ignored(mlflow_keys: Dict[str, Any]) -> None:
    """Says which of MLflow's local/docker options have no effect on Runyard."""
    ignored = []
    if mlflow_keys.get("DOCKER_ARGS"):
        ignored.append("docker args (-A)")
    if mlflow_keys.get("build_image"):
        ignored.append("--build-image")
    if mlflow_keys.get("STORAGE_DIR"):
        ignored.append("--storage-dir")
    if mlflow_keys.get("ENV_MANAGER") not in (None, "uv", "virtualenv", "local"):
        ignored.append(f"--env-manager {mlflow_keys['ENV_MANAGER']}")
    if ignored:
        _logger.warning(
            "Runyard ignores %s: Runyard's agent builds the job's environment", ", ".join(ignored)
        )


def _warn_unreachable_tracking(controller: str, tracking_uri: str) -> None:
    """A loopback tracking server is only reachable from Runyard on the same machine."""
    t = urllib.parse.urlsplit(tracking_uri).hostname
    c = urllib.parse.urlsplit(controller).hostname
    if _is_loopback(t) and not _is_loopback(c):
        _logger.warning(
            "The MLflow tracking URI %s is on this machine's loopback, but the Runyard "
            "controller (%s) is elsewhere: give a tracking URI that its agents can reach",
            tracking_uri,
            controller,
        )


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        _logger.debug("ignored: %s", e)

"""The `runyard` MLflow backend end to end, except Runyard itself: a real `mlflow server` on
sqlite on a loopback port, the fake controller of fake_runyard.py, and MLflow's own entry
points (`mlflow.projects.run(..., backend="runyard")` and the `mlflow run` CLI).

Skipped (with the reason) only when mlflow is not importable. The package must be installed
(`pip install ./python/mlflow-runyard`): MLflow finds the backend through its entry point.

Run: python -m pytest tests  (or python -m unittest discover -s tests)
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import unittest.mock
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fake_runyard import FakeRunyard  # noqa: E402

try:
    import mlflow
    from mlflow.entities import RunStatus
    from mlflow.exceptions import ExecutionException
    from mlflow.tracking import MlflowClient

    import mlflow_runyard.backend as backend_mod
    from mlflow_runyard.backend import RunyardSubmittedRun

    MLFLOW_MISSING = None
except ImportError as e:  # pragma: no cover - depends on the environment
    MLFLOW_MISSING = f"mlflow or mlflow-runyard is not importable ({e}): pip install ./python/mlflow-runyard"

URI = "https://example.invalid/repo.git"
SHA = "0123456789abcdef0123456789abcdef01234567"
# Seconds the tracking server may take to answer /health (a loaded 2-core machine needs ~50).
SERVER_START_DEADLINE = float(os.environ.get("MLFLOW_TEST_SERVER_DEADLINE", "240"))

_server = {}
# The tests' git ignores the machine's and the user's configuration.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
}
HAVE_GIT = shutil.which("git") is not None


def _git(cwd, *args) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60,
        env={**os.environ, **GIT_ENV},
    ).stdout.strip()


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_checkout(root) -> str:
    """A git checkout of a project with a commit, then an uncommitted change, an untracked file
    and an ignored file; returns its directory."""
    d = os.path.join(root, "project")
    _write(os.path.join(d, "MLproject"), "name: p\nentry_points:\n  train:\n    command: python train.py\n")
    _write(os.path.join(d, "train.py"), "print(1)\n")
    _write(os.path.join(d, ".gitignore"), "*.log\n")
    _git(root, "init", "-q", "-b", "main", d)
    _git(d, "add", "-A")
    _git(d, "commit", "-q", "-m", "one")
    _write(os.path.join(d, "train.py"), "print(2)\n")
    _write(os.path.join(d, "new.py"), "new\n")
    _write(os.path.join(d, "debug.log"), "ignored\n")
    return d


def tar_names(data: bytes):
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted(m.name for m in tar.getmembers())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setUpModule():
    if MLFLOW_MISSING:
        raise unittest.SkipTest(MLFLOW_MISSING)
    from importlib.metadata import entry_points

    eps = entry_points()
    group = eps.select(group="mlflow.project_backend") if hasattr(eps, "select") else eps.get("mlflow.project_backend", [])
    if not any(e.name == "runyard" for e in group):
        raise unittest.SkipTest("mlflow-runyard is not installed: pip install ./python/mlflow-runyard")
    given = os.environ.get("MLFLOW_TEST_TRACKING_URI")
    if given:
        # A server the caller runs (Runyard's own test suite shares one).
        _server.update(url=given, dir=None)
        mlflow.set_tracking_uri(given)
        return
    d = tempfile.mkdtemp(prefix="mlflow-runyard-test-")
    port = _free_port()
    log = open(os.path.join(d, "server.log"), "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--default-artifact-root", f"{d}/artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    _server.update(proc=proc, url=url, dir=d, log=log)
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{_server_log()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - start > SERVER_START_DEADLINE:
            tearDownModule()
            raise RuntimeError(f"mlflow server did not answer /health in {SERVER_START_DEADLINE}s:\n{_server_log()}")
        time.sleep(0.25)  # polling a process we do not control
    _server["startup_s"] = time.monotonic() - start
    print(f"\nmlflow {mlflow.__version__} server answered /health after {_server['startup_s']:.1f}s", file=sys.stderr)
    mlflow.set_tracking_uri(url)


def tearDownModule():
    proc = _server.get("proc")
    if proc and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    if _server.get("log"):
        _server["log"].close()


def _server_log() -> str:
    with open(os.path.join(_server["dir"], "server.log"), "rb") as f:
        return f.read()[-3000:].decode("utf-8", "replace")


class BackendTest(unittest.TestCase):
    def setUp(self):
        self.fake = FakeRunyard().start()
        self.addCleanup(self.fake.close)
        self.mlflow = MlflowClient(tracking_uri=_server["url"])
        self.experiment_id = self.mlflow.create_experiment(f"runyard-{uuid.uuid4().hex[:10]}")
        # Looks at jobs quickly: the fake controller answers at once.
        old = backend_mod.POLL_SECONDS
        backend_mod.POLL_SECONDS = 0.01
        self.addCleanup(setattr, backend_mod, "POLL_SECONDS", old)

    def config(self, **extra):
        return {"controller": self.fake.url, "token": "t0ken", **extra}

    def runs(self):
        return self.mlflow.search_runs([self.experiment_id])

    def submit(self, **kw):
        args = dict(
            uri=URI,
            entry_point="train",
            parameters={"alpha": 0.5, "epochs": "3"},
            backend="runyard",
            backend_config=self.config(),
            experiment_id=self.experiment_id,
            synchronous=False,
        )
        args.update(kw)
        return mlflow.projects.run(**args)

    def test_async_run_creates_the_run_with_tags_and_submits_the_spec(self):
        cfg = self.config(
            compute="gpu:2", requirements=["torch==2.5.1"], timeout="2h", retries=1,
            name="nightly", env={"SEED": "1"},
        )
        sub = self.submit(backend_config=cfg, version=SHA)
        self.assertIsInstance(sub, RunyardSubmittedRun)
        self.assertEqual(sub.job_id, self.fake.only_job_id())

        run = self.mlflow.get_run(sub.run_id)
        self.assertEqual(run.info.experiment_id, self.experiment_id)
        tags = run.data.tags
        self.assertEqual(tags["mlflow.source.name"], URI)
        self.assertEqual(tags["mlflow.source.type"], "PROJECT")
        self.assertEqual(tags["mlflow.project.entryPoint"], "train")
        self.assertEqual(tags["mlflow.source.git.repoURL"], URI)
        self.assertEqual(tags["mlflow.source.git.commit"], SHA)
        self.assertNotIn("mlflow.source.git.branch", tags)
        self.assertEqual(tags["mlflow.project.backend"], "runyard")
        self.assertEqual(tags["mlflow.project.env"], "uv")
        self.assertTrue(tags["mlflow.user"])

        spec = self.fake.last_spec()
        self.assertEqual(spec, {
            "repo": URI,
            "revision": SHA,
            "entry_point": "train",
            "parameters": {"alpha": "0.5", "epochs": "3"},
            # The run has its experiment: Runyard refuses run_id with experiment_id.
            "mlflow": {"tracking_uri": _server["url"], "run_id": sub.run_id},
            "name": "nightly",
            "compute": "gpu:2",
            "requirements": ["torch==2.5.1"],
            "timeout": "2h",
            "retries": 1,
            "env": {"SEED": "1"},
        })
        self.assertEqual(len(self.runs()), 1)

    def test_branch_version_and_default_entry_point(self):
        sub = self.submit(version="dev", entry_point="main", parameters={})
        spec = self.fake.last_spec()
        self.assertEqual((spec["revision"], spec["entry_point"], spec["parameters"]), ("dev", "main", {}))
        tags = self.mlflow.get_run(sub.run_id).data.tags
        self.assertNotIn("mlflow.source.git.commit", tags)
        self.assertNotIn("mlflow.source.git.branch", tags)
        self.submit(version=None)
        self.assertEqual(self.fake.last_spec()["revision"], "")

    def test_status_mapping(self):
        sub = self.submit()
        want = {
            "pending": "SCHEDULED", "scheduled": "SCHEDULED", "preparing": "SCHEDULED",
            "lost": "SCHEDULED", "running": "RUNNING", "stopping": "RUNNING",
            "succeeded": "FINISHED", "failed": "FAILED", "stopped": "KILLED",
        }
        for status, mlflow_status in want.items():
            self.fake.set(sub.job_id, status=status)
            self.assertEqual(sub.get_status(), mlflow_status, status)
            self.assertEqual(RunStatus.from_string(sub.get_status()), getattr(RunStatus, mlflow_status))

    def test_wait(self):
        sub = self.submit()
        self.fake.set(sub.job_id, status="succeeded", attempt=1, exit_code=0, commit=SHA)
        self.assertTrue(sub.wait())
        # The commit Runyard checked out becomes the run's commit tag.
        self.assertEqual(self.mlflow.get_run(sub.run_id).data.tags["mlflow.source.git.commit"], SHA)
        sub2 = self.submit()
        self.fake.set(sub2.job_id, status="failed", attempt=1, exit_code=2, reason="exit code 2")
        self.assertFalse(sub2.wait())

    def test_cancel_posts_stop_and_waits_until_stopped(self):
        sub = self.submit()
        self.fake.set(sub.job_id, status="running", attempt=1)
        self.fake.stop_after_gets = 2
        sub.cancel()
        self.assertEqual(self.fake.stops, [sub.job_id])
        self.assertEqual(sub.job["status"], "stopped")
        self.assertEqual(sub.get_status(), "KILLED")
        # A finished job: 409 is fine.
        sub.cancel()
        self.assertEqual(self.fake.stops, [sub.job_id, sub.job_id])

    def test_synchronous_run_waits(self):
        self.fake.next_scenario = {"job": {"status": "succeeded", "attempt": 1, "exit_code": 0}}
        sub = self.submit(synchronous=True)
        self.assertEqual(sub.get_status(), "FINISHED")
        self.fake.next_scenario = {"job": {"status": "failed", "attempt": 1, "exit_code": 1, "reason": "exit code 1"}}
        with self.assertRaises(ExecutionException):
            self.submit(synchronous=True)

    def test_follow_streams_the_log_and_fails_on_a_failed_job(self):
        self.fake.next_scenario = {
            "job": {"status": "running", "attempt": 1},
            "logs": {1: b"epoch 1\n"},
            "timeline": [
                {"log": (1, b"epoch 2\n")},
                {"status": "failed", "exit_code": 3, "reason": "exit code 3", "failure": "exit"},
            ],
        }
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            with self.assertRaises(ExecutionException) as cm:
                self.submit(backend_config=self.config(follow=True))
        self.assertEqual(out.getvalue(), "epoch 1\nepoch 2\n")
        msg = str(cm.exception)
        self.assertIn("failed: exit code 3", msg)
        self.assertIn(self.fake.only_job_id(), msg)

        self.fake.next_scenario = {
            "job": {"status": "running", "attempt": 1},
            "timeline": [{"status": "succeeded", "exit_code": 0, "log": (1, b"done\n")}],
        }
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sub = self.submit(backend_config=self.config(follow=True))
        self.assertEqual(out.getvalue(), "done\n")
        self.assertEqual(sub.job["status"], "succeeded")

    def test_reuses_a_given_run(self):
        run = self.mlflow.create_run(self.experiment_id, tags={"mlflow.user": "someone"})
        sub = self.submit(backend_config=self.config(run_id=run.info.run_id))
        self.assertEqual(sub.run_id, run.info.run_id)
        self.assertEqual(self.fake.last_spec()["mlflow"]["run_id"], run.info.run_id)
        self.assertEqual(len(self.runs()), 1)
        tags = self.mlflow.get_run(run.info.run_id).data.tags
        self.assertEqual(tags["mlflow.user"], "someone")  # kept
        self.assertEqual(tags["mlflow.project.backend"], "runyard")
        self.assertEqual(tags["mlflow.project.entryPoint"], "train")
        with self.assertRaises(ExecutionException) as cm:
            self.submit(backend_config=self.config(run_id="0" * 32))
        self.assertIn("cannot use MLflow run", str(cm.exception))

    def test_config_from_a_json_file(self):
        path = os.path.join(tempfile.mkdtemp(), "runyard.json")
        with open(path, "w") as f:
            json.dump(self.config(compute="cpu-small"), f)
        self.submit(backend_config=path)
        self.assertEqual(self.fake.last_spec()["compute"], "cpu-small")

    def test_refusals_submit_nothing(self):
        cases = [
            (dict(backend_config=self.config(compue="gpu")), "unknown Runyard backend config key(s): 'compue'"),
            (dict(backend_config=self.config(retries="2")), "`retries`: '2' is not a whole number"),
            (dict(backend_config=self.config(follow="yes")), "`follow`: 'yes' is not true or false"),
            (dict(uri=os.path.join(HERE, "no-such-dir")), "no such directory, and not a git repository URI"),
            (dict(uri=os.path.join(HERE, "test_backend.py")), "is a file"),
            (dict(uri=HERE, version="main"), "Setting a version is only supported for Git project URIs"),
            (dict(uri=HERE + "#sub"), "run the subdirectory itself"),
            (dict(uri=URI + "#sub"), "subdirectory"),
            (dict(uri="https://example.invalid/p.zip"), "ZIP"),
        ]
        for kw, words in cases:
            with self.subTest(words):
                with self.assertRaises(ExecutionException) as cm:
                    self.submit(**kw)
                self.assertIn(words, str(cm.exception))
        self.assertEqual(self.fake.specs, [])
        self.assertEqual(self.fake.uploads, [])
        self.assertEqual(len(self.runs()), 0)

    @unittest.skipUnless(HAVE_GIT, "no git command")
    def test_local_checkout_is_sent_as_a_snapshot(self):
        root = tempfile.mkdtemp(prefix="runyard-local-")
        self.addCleanup(shutil.rmtree, root, True)
        d = make_checkout(root)
        _git(d, "remote", "add", "origin", "https://someone:secret@example.invalid/org/p.git")
        head = _git(d, "rev-parse", "HEAD")
        with unittest.mock.patch.dict(os.environ, GIT_ENV):
            sub = self.submit(uri=d)
        spec = self.fake.last_spec()
        self.assertNotIn("revision", spec)
        self.assertRegex(spec["repo"], r"^snapshot:sha256:[0-9a-f]{64}$")
        digest = spec["repo"].rsplit(":", 1)[1]
        self.assertEqual(self.fake.uploads, [(digest, 201)])
        names = tar_names(self.fake.snapshots[digest])
        self.assertEqual(names, [".gitignore", "MLproject", "new.py", "train.py"])
        tags = self.mlflow.get_run(sub.run_id).data.tags
        self.assertEqual(tags["mlflow.source.name"], d)
        self.assertEqual(tags["mlflow.source.type"], "PROJECT")
        self.assertEqual(tags["mlflow.source.git.commit"], head)
        self.assertEqual(tags["mlflow.source.git.repoURL"], "https://example.invalid/org/p.git")
        self.assertEqual(tags["runyard.snapshot"], spec["repo"])
        self.assertEqual(tags["runyard.snapshot.dirty"], "true")
        self.assertEqual(tags["mlflow.project.backend"], "runyard")
        # A commit reported by the job does not replace HEAD's.
        self.fake.set(sub.job_id, status="succeeded", attempt=1, exit_code=0, commit="f" * 40)
        self.assertTrue(sub.wait())
        self.assertEqual(self.mlflow.get_run(sub.run_id).data.tags["mlflow.source.git.commit"], head)

        # The same tree as a file:// URI: the same snapshot, already stored.
        with unittest.mock.patch.dict(os.environ, GIT_ENV):
            self.submit(uri="file://" + d)
        self.assertEqual(self.fake.last_spec()["repo"], spec["repo"])
        self.assertEqual(self.fake.uploads[-1], (digest, 200))

        # A bare repository is git, file:// URI or path: Runyard clones it, at a version too.
        bare = os.path.join(root, "bare.git")
        _git(root, "clone", "-q", "--bare", d, bare)
        with unittest.mock.patch.dict(os.environ, GIT_ENV):
            for uri in ("file://" + bare, bare):
                self.submit(uri=uri, version="main")
                got = self.fake.last_spec()
                self.assertEqual((got["repo"], got["revision"]), ("file://" + bare, "main"))
        self.assertEqual(len(self.fake.uploads), 2)

    def test_plain_directory_refusals(self):
        root = tempfile.mkdtemp(prefix="runyard-local-")
        self.addCleanup(shutil.rmtree, root, True)
        d = os.path.join(root, "project")
        _write(os.path.join(d, "MLproject"), "name: p\n")
        os.symlink("../../secrets", os.path.join(d, "data"))
        with self.assertRaises(ExecutionException) as cm:
            self.submit(uri=d)
        self.assertIn(os.path.join(d, "data"), str(cm.exception))
        self.assertIn("outside", str(cm.exception))
        os.remove(os.path.join(d, "data"))
        self.fake.snapshot_limit = 1024
        with self.assertRaises(ExecutionException) as cm:
            self.submit(uri=d)
        self.assertIn(f"Runyard did not take the snapshot of {d} (1 files, 10 KiB): "
                      "the snapshot is 10240 bytes, over the limit of 1024 bytes", str(cm.exception))
        self.assertEqual(self.fake.specs, [])
        self.assertEqual(len(self.runs()), 0)
        self.fake.snapshot_limit = 1 << 20
        sub = self.submit(uri=d)
        tags = self.mlflow.get_run(sub.run_id).data.tags
        self.assertEqual(tags["mlflow.source.name"], d)
        self.assertTrue(tags["runyard.snapshot"].startswith("snapshot:sha256:"))
        self.assertNotIn("runyard.snapshot.dirty", tags)  # no git: nothing to differ from
        self.assertNotIn("mlflow.source.git.commit", tags)

    def test_tracking_uri_must_be_http(self):
        d = tempfile.mkdtemp()
        mlflow.set_tracking_uri(f"sqlite:///{d}/local.db")
        try:
            exp = mlflow.create_experiment("local")
            with self.assertRaises(ExecutionException) as cm:
                self.submit(experiment_id=exp)
        finally:
            mlflow.set_tracking_uri(_server["url"])
        self.assertIn("tracking server", str(cm.exception))
        self.assertEqual(self.fake.specs, [])

    def test_a_refused_spec_fails_the_new_run(self):
        with self.assertRaises(ExecutionException) as cm:
            self.submit(backend_config=self.config(compute="tpu"))
        self.assertIn("Runyard did not take the job (compute): unknown compute `tpu`", str(cm.exception))
        runs = self.runs()
        self.assertEqual(len(runs), 1)
        self.assertEqual(runs[0].info.status, "FAILED")

    def test_mlflow_run_cli(self):
        """`mlflow run --backend runyard`: async prints the ids; follow maps failure to exit 1."""
        env = {**os.environ, "MLFLOW_TRACKING_URI": _server["url"], "MLFLOW_EXPERIMENT_ID": self.experiment_id}

        def cli(cfg):
            return subprocess.run(
                [sys.executable, "-m", "mlflow", "run", URI, "-e", "train", "-P", "alpha=0.5",
                 "--backend", "runyard", "--backend-config", json.dumps(cfg)],
                capture_output=True, text=True, env=env, timeout=300,
            )

        out = cli(self.config())
        self.assertEqual(out.returncode, 0, out.stderr)
        job_id = self.fake.only_job_id()
        self.assertIn(f"Submitted Runyard job {job_id} for MLflow run", out.stderr)
        self.assertEqual(self.fake.last_spec()["parameters"], {"alpha": "0.5"})

        self.fake.next_scenario = {
            "job": {"status": "failed", "attempt": 1, "exit_code": 3, "reason": "exit code 3"},
            "logs": {1: b"Traceback: boom\n"},
        }
        out = cli(self.config(follow=True))
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertEqual(out.stdout, "Traceback: boom\n")
        self.assertIn("failed: exit code 3", out.stderr)

        self.fake.next_scenario = {"job": {"status": "succeeded", "attempt": 1, "exit_code": 0}, "logs": {1: b"ok\n"}}
        out = cli(self.config(follow=True))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, "ok\n")

    @unittest.skipUnless(HAVE_GIT, "no git command")
    def test_mlflow_run_cli_local_directory(self):
        """`mlflow run .` in a checkout: a snapshot, tagged; `--version` with it: refused."""
        root = tempfile.mkdtemp(prefix="runyard-local-")
        self.addCleanup(shutil.rmtree, root, True)
        d = make_checkout(root)
        head = _git(d, "rev-parse", "HEAD")
        env = {**os.environ, **GIT_ENV, "MLFLOW_TRACKING_URI": _server["url"],
               "MLFLOW_EXPERIMENT_ID": self.experiment_id}

        def cli(*extra):
            return subprocess.run(
                [sys.executable, "-m", "mlflow", "run", ".", "-e", "train", *extra,
                 "--backend", "runyard", "--backend-config", json.dumps(self.config())],
                capture_output=True, text=True, env=env, cwd=d, timeout=300,
            )

        out = cli()
        self.assertEqual(out.returncode, 0, out.stderr)
        spec = self.fake.last_spec()
        self.assertRegex(spec["repo"], r"^snapshot:sha256:[0-9a-f]{64}$")
        self.assertNotIn("revision", spec)
        self.assertIn(f"Sent {d} to Runyard as {spec['repo']} (4 files", out.stderr)
        self.assertIn(f"changes on commit {head[:12]}", out.stderr)
        [run] = self.runs()
        tags = run.data.tags
        self.assertEqual(tags["mlflow.source.name"], d)
        self.assertEqual(tags["mlflow.source.type"], "PROJECT")
        self.assertEqual(tags["mlflow.source.git.commit"], head)
        self.assertEqual(tags["runyard.snapshot"], spec["repo"])
        self.assertEqual(tags["runyard.snapshot.dirty"], "true")

        out = cli("--version", head)
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn("Setting a version is only supported for Git project URIs", out.stderr)
        self.assertEqual(len(self.fake.specs), 1)
        self.assertEqual(len(self.fake.uploads), 1)


if __name__ == "__main__":
    unittest.main()

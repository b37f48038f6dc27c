"""runyard_client against the fake controller: no MLflow needed.

Run: python -m pytest tests  (or python -m unittest discover -s tests)
"""

import io
import os
import socket
import subprocess
import sys
import time
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import runyard_client  # noqa: E402
from fake_runyard import FakeRunyard  # noqa: E402
from runyard_client import Client, RunyardError, WaitTimeout  # noqa: E402
from runyard_client import client as client_mod  # noqa: E402

SPEC = {"repo": "https://example.invalid/repo.git", "entry_point": "main"}


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.fake = FakeRunyard().start()
        self.addCleanup(self.fake.close)
        self.client = Client(controller=self.fake.url + "/", token="t0ken", timeout=10)

    def test_submit_job_stop(self):
        job = self.client.submit(SPEC)
        self.assertEqual(job["status"], "pending")
        self.assertEqual(self.fake.last_spec(), SPEC)
        self.assertEqual(self.client.job(job["id"])["id"], job["id"])
        stopped = self.client.stop(job["id"])
        self.assertEqual(stopped["status"], "stopping")
        self.assertEqual(self.fake.stops, [job["id"]])
        self.assertEqual(self.client.wait(job["id"], poll=0.01, timeout=10)["status"], "stopped")
        # A finished job: 409, with the server's message.
        with self.assertRaises(RunyardError) as cm:
            self.client.stop(job["id"])
        self.assertEqual(cm.exception.status, 409)
        self.assertIn("already stopped", cm.exception.message)

    def test_errors_carry_status_message_and_field(self):
        with self.assertRaises(RunyardError) as cm:
            self.client.submit({**SPEC, "compute": "tpu"})
        e = cm.exception
        self.assertEqual((e.status, e.field), (400, "compute"))
        self.assertIn("unknown compute `tpu`", e.message)
        self.assertIn("HTTP 400", str(e))
        with self.assertRaises(RunyardError) as cm:
            self.client.job("nope/../x")
        self.assertEqual(cm.exception.status, 404)
        self.assertIn("GET /api/v1/jobs/nope%2F..%2Fx", self.fake.requests)
        with self.assertRaises(RunyardError) as cm:
            Client(controller=self.fake.url, token="wrong").job("j1")
        self.assertEqual(cm.exception.status, 401)
        self.assertIn("RUNYARD_TOKEN", str(cm.exception))

    def test_unreachable_controller(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        with self.assertRaises(RunyardError) as cm:
            Client(controller=f"http://127.0.0.1:{port}", token="x", timeout=5).job("j1")
        self.assertIsNone(cm.exception.status)
        self.assertTrue(cm.exception.transient)
        self.assertIn("cannot connect to the controller", str(cm.exception))

    def test_settings_from_environment(self):
        env = {"RUNYARD_CONTROLLER": self.fake.url, "RUNYARD_TOKEN": "t0ken", "RUNYARD_CA": ""}
        with mock.patch.dict(os.environ, env):
            c = Client()
        self.assertEqual(c.controller, self.fake.url)
        self.assertEqual(c.submit(SPEC)["status"], "pending")
        with self.assertRaises(RunyardError):
            Client(controller="ftp://x")
        with mock.patch.dict(os.environ, {"RUNYARD_CONTROLLER": ""}):
            with mock.patch.dict(os.environ, {"HOME": "/nonexistent"}):
                self.assertEqual(Client(token="x").controller, runyard_client.DEFAULT_CONTROLLER)

    def test_admin_token_of_the_data_dir_for_a_local_controller_only(self):
        import tempfile

        d = tempfile.mkdtemp()
        with open(os.path.join(d, "admin.token"), "w") as f:
            f.write("t0ken\n")
        with mock.patch.dict(os.environ, {"RUNYARD_DATA_DIR": d, "RUNYARD_TOKEN": ""}):
            self.assertEqual(Client(controller=self.fake.url).token, "t0ken")
            self.assertIsNone(Client(controller="http://runyard.example.invalid:7900").token)

    def test_missing_ca_file_is_a_clear_error(self):
        with self.assertRaises(RunyardError) as cm:
            Client(controller="https://127.0.0.1:1", token="x", ca="/nonexistent/ca.crt")
        self.assertIn("cannot use the CA file /nonexistent/ca.crt", str(cm.exception))

    def test_wait_is_bounded(self):
        job = self.client.submit(SPEC)
        start = time.monotonic()
        with self.assertRaises(WaitTimeout) as cm:
            self.client.wait(job["id"], poll=0.02, timeout=0.3)
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(cm.exception.job["status"], "pending")
        self.fake.set(job["id"], status="succeeded", attempt=1, exit_code=0)
        seen = []
        done = self.client.wait(job["id"], poll=0.02, timeout=10, on_change=seen.append)
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual([j["status"] for j in seen], ["succeeded"])

    def test_follow_logs_across_attempts(self):
        # Attempt 1 prints and fails, attempt 2 prints and succeeds: both logs, in order.
        self.fake.next_scenario = {
            "job": {"status": "running", "attempt": 1},
            "logs": {1: b"one\n"},
            "timeline": [
                {"log": (1, b"two\n")},
                {"status": "scheduled", "attempt": 2},
                {"status": "running", "log": (2, b"three\n")},
                {"status": "succeeded", "exit_code": 0, "log": (2, "vier \u00fc\n".encode())},
            ],
        }
        job = self.client.submit(SPEC)
        out = io.StringIO()
        done = self.client.follow_logs(job["id"], out=out, poll=0.01, timeout=30)
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual(out.getvalue(), "one\ntwo\nthree\nvier \u00fc\n")

    def test_follow_logs_resumes_a_cut_stream_without_repeating(self):
        # Streams cut every 3 bytes (mid-character too): the text still comes out exactly once.
        self.fake.cut_streams_after = 3
        text = "h\u00e9llo w\u00f6rld\nzwei \u20ac\n"
        self.fake.next_scenario = {
            "job": {"status": "failed", "attempt": 1, "reason": "exit code 3", "exit_code": 3},
            "logs": {1: text.encode()},
        }
        job = self.client.submit(SPEC)
        out = io.StringIO()
        done = self.client.follow_logs(job["id"], out=out, poll=0.01, timeout=30)
        self.assertEqual(done["status"], "failed")
        self.assertEqual(out.getvalue(), text)
        offsets = [r for r in self.fake.requests if "/logs?" in r]
        self.assertGreater(len(offsets), 5)

    def test_follow_logs_of_a_job_that_never_started(self):
        job = self.client.submit(SPEC)
        self.fake.set(job["id"], status="stopped", reason="stopped by the user")
        out = io.StringIO()
        self.assertEqual(self.client.follow_logs(job["id"], out=out, poll=0.01, timeout=10)["status"], "stopped")
        self.assertEqual(out.getvalue(), "")

    def test_follow_logs_is_bounded(self):
        self.fake.next_scenario = {"job": {"status": "running", "attempt": 1}, "logs": {1: b"x\n"}}
        job = self.client.submit(SPEC)
        start = time.monotonic()
        with mock.patch.object(client_mod, "STREAM_IDLE_TIMEOUT", 0.2):
            with self.assertRaises(WaitTimeout):
                self.client.follow_logs(job["id"], out=io.StringIO(), poll=0.01, timeout=1.0)
        self.assertLess(time.monotonic() - start, 10)


class NoMlflowTest(unittest.TestCase):
    def test_client_does_not_import_mlflow(self):
        src = os.path.join(os.path.dirname(HERE), "src")
        code = "import sys, runyard_client; print('mlflow' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONPATH": src},
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "False")


if __name__ == "__main__":
    unittest.main()

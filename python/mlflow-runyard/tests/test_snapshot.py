"""Snapshots of local project directories (runyard_client.snapshot_of) and their upload to the
fake controller: no MLflow needed. Needs the git command (the git tests are skipped without it).

Run: python -m pytest tests  (or python -m unittest discover -s tests)
"""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from fake_runyard import FakeRunyard  # noqa: E402
from runyard_client import (  # noqa: E402
    Client,
    RunyardError,
    SnapshotError,
    SnapshotTooLarge,
    snapshot_of,
)
from runyard_client.snapshot import is_git_repository_dir  # noqa: E402

HAVE_GIT = shutil.which("git") is not None
# The tests' git ignores the machine's and the user's configuration (global excludes, hooks).
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


def write(path, text="", mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)


def members(snap):
    """{name: (type, mode, content or link target)} of a snapshot's tar."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(snap.data)) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", ""), m.name
            if m.isdir():
                out[m.name] = ("dir", m.mode, None)
            elif m.issym():
                out[m.name] = ("link", m.mode, m.linkname)
            else:
                out[m.name] = ("file", m.mode, tar.extractfile(m).read().decode())
    return out


class Base(unittest.TestCase):
    def setUp(self):
        patch = mock.patch.dict(os.environ, GIT_ENV)
        patch.start()
        self.addCleanup(patch.stop)
        self.tmp = tempfile.mkdtemp(prefix="runyard-snap-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        # Nothing above the temporary directory is taken for a checkout.
        os.environ["GIT_CEILING_DIRECTORIES"] = os.path.dirname(os.path.realpath(self.tmp))

    def git(self, cwd, *args):
        return subprocess.run(
            ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=60
        ).stdout.strip()

    def checkout(self):
        """A checkout with a commit, then an uncommitted change, an untracked file, an ignored
        file and a tracked file deleted in the working tree."""
        repo = os.path.join(self.tmp, "repo")
        write(os.path.join(repo, "MLproject"), "name: p\n")
        write(os.path.join(repo, "train.py"), "print(1)\n")
        write(os.path.join(repo, "run.sh"), "#!/bin/sh\n", mode=0o755)
        write(os.path.join(repo, "gone.py"), "x\n")
        write(os.path.join(repo, ".gitignore"), "*.log\n")
        write(os.path.join(repo, "sub", "MLproject"), "name: sub\n")
        write(os.path.join(repo, "sub", "data.csv"), "a,b\n")
        self.git(repo, "init", "-q", "-b", "main")
        self.git(repo, "add", "-A")
        self.git(repo, "commit", "-q", "-m", "one")
        write(os.path.join(repo, "train.py"), "print(2)\n")  # uncommitted change
        write(os.path.join(repo, "new.py"), "new\n")  # untracked
        write(os.path.join(repo, "debug.log"), "noise\n")  # ignored
        write(os.path.join(repo, "sub", "out.log"), "noise\n")  # ignored by the parent's rule
        os.remove(os.path.join(repo, "gone.py"))
        return repo


@unittest.skipUnless(HAVE_GIT, "no git command")
class GitSnapshotTest(Base):
    def test_working_tree_with_changes_untracked_not_ignored(self):
        repo = self.checkout()
        snap = snapshot_of(repo)
        got = members(snap)
        self.assertEqual(sorted(got), [
            ".gitignore", "MLproject", "new.py", "run.sh", "sub", "sub/MLproject", "sub/data.csv",
            "train.py",
        ])
        self.assertEqual(got["train.py"], ("file", 0o644, "print(2)\n"))
        self.assertEqual(got["new.py"], ("file", 0o644, "new\n"))
        self.assertEqual(got["run.sh"][:2], ("file", 0o755))
        self.assertEqual(got["sub"], ("dir", 0o755, None))
        self.assertEqual(snap.files, 7)
        self.assertEqual(snap.commit, self.git(repo, "rev-parse", "HEAD"))
        self.assertIs(snap.dirty, True)
        self.assertEqual(os.path.realpath(snap.git_root), os.path.realpath(repo))
        # The same tree: the same bytes, the same id.
        self.assertEqual(snapshot_of(repo).data, snap.data)
        self.assertEqual(snap.id, "snapshot:sha256:" + snap.sha256)

        # Everything committed: clean; a change: another id.
        self.git(repo, "add", "-A")
        self.git(repo, "commit", "-q", "-m", "two")
        clean = snapshot_of(repo)
        self.assertIs(clean.dirty, False)
        self.assertEqual(clean.data, snap.data)  # the same files as before
        write(os.path.join(repo, "train.py"), "print(3)\n")
        self.assertNotEqual(snapshot_of(repo).id, snap.id)

    def test_a_subdirectory_of_a_checkout(self):
        repo = self.checkout()
        snap = snapshot_of(os.path.join(repo, "sub"))
        self.assertEqual(sorted(members(snap)), ["MLproject", "data.csv"])
        self.assertEqual(snap.commit, self.git(repo, "rev-parse", "HEAD"))
        self.assertIs(snap.dirty, False)  # the changes are outside `sub`
        write(os.path.join(repo, "sub", "more.py"), "")
        self.assertIs(snapshot_of(os.path.join(repo, "sub")).dirty, True)

    def test_symlinks_inside_kept_escaping_refused(self):
        repo = self.checkout()
        os.symlink("train.py", os.path.join(repo, "alias.py"))
        os.symlink("../sub", os.path.join(repo, "sub", "self"))
        got = members(snapshot_of(repo))
        self.assertEqual(got["alias.py"], ("link", 0o777, "train.py"))
        self.assertEqual(got["sub/self"][2], "../sub")
        os.symlink("../../etc/passwd", os.path.join(repo, "sub", "leak"))
        with self.assertRaises(SnapshotError) as cm:
            snapshot_of(repo)
        self.assertIn(os.path.join(repo, "sub", "leak"), str(cm.exception))
        self.assertIn("outside", str(cm.exception))
        os.remove(os.path.join(repo, "sub", "leak"))
        os.symlink("/etc/passwd", os.path.join(repo, "abs"))
        with self.assertRaises(SnapshotError) as cm:
            snapshot_of(repo)
        self.assertIn("absolute path `/etc/passwd`", str(cm.exception))

    def test_nested_repository_and_nothing_to_send(self):
        repo = self.checkout()
        nested = os.path.join(repo, "vendor", "lib")
        write(os.path.join(nested, "lib.py"), "v\n")
        write(os.path.join(nested, ".gitignore"), "*.tmp\n")
        write(os.path.join(nested, "lib.tmp"), "ignored by its own rule\n")
        self.git(nested, "init", "-q", "-b", "main")
        got = members(snapshot_of(repo))
        self.assertIn("vendor/lib/lib.py", got)
        self.assertNotIn("vendor/lib/lib.tmp", got)
        self.assertIn("vendor/lib/.gitignore", got)
        self.assertFalse(any(n.startswith("vendor/lib/.git/") or n == "vendor/lib/.git" for n in got))

        os.makedirs(os.path.join(repo, "logs"))
        write(os.path.join(repo, "logs", "a.log"), "")
        with self.assertRaises(SnapshotError) as cm:
            snapshot_of(os.path.join(repo, "logs"))
        self.assertIn("no files to send", str(cm.exception))

    def test_a_repository_is_not_a_working_tree(self):
        repo = self.checkout()
        bare = os.path.join(self.tmp, "bare.git")
        self.git(self.tmp, "clone", "-q", "--bare", repo, bare)
        self.assertTrue(is_git_repository_dir(bare))
        self.assertTrue(is_git_repository_dir(os.path.join(repo, ".git")))
        self.assertFalse(is_git_repository_dir(repo))
        with self.assertRaises(SnapshotError) as cm:
            snapshot_of(bare)
        self.assertIn("not a working tree", str(cm.exception))

    def test_without_git_a_checkout_is_a_plain_directory(self):
        repo = self.checkout()
        with mock.patch.dict(os.environ, {"PATH": self.tmp}):  # no git there
            snap = snapshot_of(repo)
        got = members(snap)
        self.assertIn("debug.log", got)  # nothing tells what git ignores
        self.assertFalse(any(n == ".git" or n.startswith(".git/") for n in got))
        self.assertIsNone(snap.commit)
        self.assertIsNone(snap.dirty)


class PlainSnapshotTest(Base):
    def test_plain_directory(self):
        d = os.path.join(self.tmp, "proj")
        write(os.path.join(d, "MLproject"), "name: p\n")
        write(os.path.join(d, "bin", "go"), "#!/bin/sh\n", mode=0o775)
        write(os.path.join(d, "pkg", "__pycache__", "m.cpython-311.pyc"), "x")
        write(os.path.join(d, "pkg", "m.py"), "m\n")
        write(os.path.join(d, ".git", "HEAD"), "ref: refs/heads/main\n")
        write(os.path.join(d, "notes.log"), "kept: no git here\n")
        os.makedirs(os.path.join(d, "empty"))
        os.symlink("pkg", os.path.join(d, "pkg-link"))
        snap = snapshot_of(d)
        got = members(snap)
        self.assertEqual(sorted(got), [
            "MLproject", "bin", "bin/go", "empty", "notes.log", "pkg", "pkg-link", "pkg/m.py",
        ])
        self.assertEqual(got["bin/go"][:2], ("file", 0o755))
        self.assertEqual(got["pkg-link"], ("link", 0o777, "pkg"))
        self.assertEqual((snap.files, snap.commit, snap.dirty, snap.git_root), (5, None, None, None))
        self.assertEqual(snapshot_of(d + "/").data, snap.data)

    def test_escaping_symlink_refused(self):
        d = os.path.join(self.tmp, "proj")
        write(os.path.join(d, "a.py"), "")
        os.symlink("../outside", os.path.join(d, "data"))
        with self.assertRaises(SnapshotError) as cm:
            snapshot_of(d)
        self.assertIn(os.path.join(d, "data"), str(cm.exception))
        self.assertIn("symlink to `../outside`", str(cm.exception))

    def test_over_the_limit_before_reading(self):
        d = os.path.join(self.tmp, "proj")
        write(os.path.join(d, "a.py"), "a\n")
        write(os.path.join(d, "weights.bin"), "w" * 50_000)
        with mock.patch("builtins.open", side_effect=AssertionError("read")):
            with self.assertRaises(SnapshotTooLarge) as cm:
                snapshot_of(d, max_size=20_000)
        e = cm.exception
        self.assertEqual(e.limit, 20_000)
        self.assertGreater(e.size, 50_000)
        msg = str(e)
        self.assertIn(f"({e.size} bytes)", msg)
        self.assertIn("over the snapshot limit of 19.5 KiB (20000 bytes)", msg)
        self.assertIn("weights.bin (48.8 KiB)", msg)
        self.assertEqual(snapshot_of(d, max_size=60 * 1024).files, 2)


class UploadTest(Base):
    def setUp(self):
        super().setUp()
        self.fake = FakeRunyard().start()
        self.addCleanup(self.fake.close)
        self.client = Client(controller=self.fake.url, token="t0ken", timeout=10)
        self.dir = os.path.join(self.tmp, "proj")
        write(os.path.join(self.dir, "MLproject"), "name: p\n")

    def test_upload_new_then_known(self):
        snap = snapshot_of(self.dir)
        first = self.client.upload_snapshot(snap.data)
        self.assertEqual(first, {"snapshot": snap.id, "sha256": snap.sha256, "size": snap.size,
                                 "files": 1, "created": True})
        again = self.client.upload_snapshot(snapshot_of(self.dir))
        self.assertEqual((again["snapshot"], again["created"]), (snap.id, False))
        self.assertEqual(self.fake.snapshots[snap.sha256], snap.data)
        self.assertEqual(self.fake.uploads, [(snap.sha256, 201), (snap.sha256, 200)])

    def test_size_checked_before_upload_and_by_the_controller(self):
        data = snapshot_of(self.dir).data
        with self.assertRaises(SnapshotTooLarge) as cm:
            self.client.upload_snapshot(data, max_size=1000)
        self.assertIn(f"the snapshot is 10 KiB ({len(data)} bytes), over the snapshot limit of "
                      "1000 bytes", str(cm.exception))
        self.assertEqual(self.fake.requests, [])
        self.fake.snapshot_limit = 2048
        with self.assertRaises(RunyardError) as cm:
            self.client.upload_snapshot(data)
        self.assertEqual(cm.exception.status, 413)
        self.assertIn("over the limit of 2048 bytes", str(cm.exception))
        self.assertEqual(self.fake.snapshots, {})

    def test_controller_refusing_without_reading(self):
        self.fake.snapshot_limit = 2048
        self.fake.refuse_unread = True
        with self.assertRaises(RunyardError) as cm:
            self.client.upload_snapshot(b"\0" * (8 << 20))
        e = cm.exception
        # Either the 413 arrives, or the connection is cut while sending: both say why.
        if e.status is None:
            self.assertIn("may have refused it as too large", str(e))
        else:
            self.assertEqual(e.status, 413)


if __name__ == "__main__":
    unittest.main()

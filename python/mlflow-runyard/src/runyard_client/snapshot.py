"""Deterministic tar snapshots of local project directories, for `POST /api/v1/snapshots`.

A snapshot's id is the sha256 of its bytes, so the archive is built the same way every time:
paths sorted (as bytes), mtime 0, uid/gid 0, empty user and group names, files 0o644 or 0o755
(from the owner's executable bit), directories 0o755, symlinks 0o777; GNU tar format (long
names as GNU long-name entries), uncompressed. An unchanged tree gives the same bytes.

Which files:
- inside a git checkout (found with `git rev-parse --show-toplevel`): what
  `git ls-files --cached --others --exclude-standard` lists under the project directory, read
  from the working tree: tracked files with their uncommitted changes, plus untracked files that
  are not ignored; tracked files deleted from the working tree are left out. A submodule or a
  nested repository is archived the same way, from its own working tree.
- else (a plain directory, or no `git` command): every file under it, except `.git` and
  `__pycache__` directories.
Symlinks are kept when their target is relative and stays inside the project directory; any
other symlink is refused. Sockets, FIFOs and devices are left out (listed in `skipped`).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import subprocess
import tarfile
import urllib.parse
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from runyard_client.client import RunyardError

# The controller's default limit; the controller has the final word (413).
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
SNAPSHOT_PREFIX = "snapshot:sha256:"
# Seconds one git command may take.
GIT_TIMEOUT = 120.0
# Variables that would point git elsewhere than the project directory.
_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX", "GIT_COMMON_DIR")
_EXCLUDED_PLAIN = (".git", "__pycache__")
_BLOCK = 512
_RECORD = 20 * _BLOCK


class SnapshotError(RunyardError):
    """A project directory cannot be made into a snapshot (message names the file at fault)."""

    @property
    def transient(self) -> bool:
        return False


class SnapshotTooLarge(SnapshotError):
    """The archive would be over the size limit: `size` and `limit` in bytes."""

    def __init__(self, message: str, size: int, limit: int):
        super().__init__(message)
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Snapshot:
    """A project directory as a tar archive (`data`), with what was learnt making it.

    `files`: regular files and symlinks in it; `commit`: the checkout's HEAD (None outside git
    or before the first commit); `dirty`: whether the archived files differ from HEAD (tracked
    changes, untracked files; None outside git); `git_root`: the checkout's top directory;
    `skipped`: paths left out because they are neither files, directories nor symlinks.
    """

    data: bytes
    files: int
    path: str
    commit: Optional[str] = None
    dirty: Optional[bool] = None
    git_root: Optional[str] = None
    skipped: Tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def id(self) -> str:
        """The id the controller gives these bytes: `snapshot:sha256:<hex>`."""
        return SNAPSHOT_PREFIX + self.sha256


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            text = f"{n / scale:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{n} bytes"  # pragma: no cover


def too_large_message(what: str, size: int, limit: int, about: bool = False) -> str:
    return (
        f"{what} is {'about ' if about else ''}{human_size(size)} ({size} bytes), over the "
        f"snapshot limit of {human_size(limit)} ({limit} bytes)"
    )


# -- git ----------------------------------------------------------------------------------------


def _git(args: List[str], cwd: str) -> Optional[subprocess.CompletedProcess]:
    """Runs git in `cwd`; None when there is no git command."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
    env["LC_ALL"] = "C"  # the messages matched below are git's English ones
    try:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", cwd, *args],
            capture_output=True,
            env=env,
            timeout=GIT_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise SnapshotError(f"`git {' '.join(args)}` in {cwd} took over {GIT_TIMEOUT:g}s") from None


def _git_out(args: List[str], cwd: str) -> bytes:
    r = _git(args, cwd)
    if r is None:
        raise SnapshotError("the git command is gone")
    if r.returncode != 0:
        raise SnapshotError(
            f"`git {' '.join(args)}` failed in {cwd}: {r.stderr.decode('utf-8', 'replace').strip()}"
        )
    return r.stdout


def is_git_repository_dir(path: str) -> bool:
    """Whether `path` is a bare repository or inside a `.git` directory (a repository, not a
    working tree). False without the git command."""
    r = _git(["rev-parse", "--is-inside-git-dir", "--is-bare-repository"], path)
    if r is None or r.returncode != 0:
        return False
    return "true" in r.stdout.decode().split()


def git_toplevel(path: str) -> Optional[str]:
    """The top of the git working tree holding `path`; None outside git or without git.

    A checkout git refuses to read (for example "dubious ownership") is an error, not a plain
    directory: archiving it as one would take in its ignored files.
    """
    r = _git(["rev-parse", "--show-toplevel"], path)
    if r is None:
        return None
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip()
        if "not a git repository" in err:
            return None
        raise SnapshotError(f"git cannot read {path}: {err}")
    return os.fsdecode(r.stdout.rstrip(b"\n")) or None


def git_origin_url(path: str) -> Optional[str]:
    """The `origin` remote's URL of the checkout at `path`, without user and password."""
    r = _git(["remote", "get-url", "origin"], path)
    if r is None or r.returncode != 0:
        return None
    url = r.stdout.decode("utf-8", "replace").strip()
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _git_head(path: str) -> Optional[str]:
    r = _git(["rev-parse", "--verify", "-q", "HEAD^{commit}"], path)
    if r is None or r.returncode != 0:
        return None
    return r.stdout.decode().strip() or None


def _git_dirty(path: str) -> bool:
    out = _git_out(["status", "--porcelain", "-z", "--untracked-files=normal", "--", "."], path)
    return bool(out.strip(b"\0"))


# -- listing ------------------------------------------------------------------------------------

# An entry: ("dir", None) | ("file", (full path, size, executable)) | ("link", target)
_Entries = Dict[str, Tuple[str, object]]


def _add_parents(entries: _Entries, rel: str) -> None:
    parent = posixpath.dirname(rel)
    while parent and parent not in entries:
        entries[parent] = ("dir", None)
        parent = posixpath.dirname(parent)


def _add(entries: _Entries, skipped: List[str], full: str, rel: str, root: str) -> Optional[os.stat_result]:
    """Adds the file, symlink or (empty) directory at `full` as `rel`; returns its lstat, or None
    when it is gone."""
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None  # tracked, but deleted in the working tree
    except OSError as e:
        raise SnapshotError(f"cannot read {full}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        _check_link(rel, target, full, root)
        entries[rel] = ("link", target)
    elif stat.S_ISREG(st.st_mode):
        entries[rel] = ("file", (full, st.st_size, bool(st.st_mode & stat.S_IXUSR)))
    elif stat.S_ISDIR(st.st_mode):
        entries.setdefault(rel, ("dir", None))
    else:
        skipped.append(rel)
        return st
    _add_parents(entries, rel)
    return st


def _check_link(rel: str, target: str, full: str, root: str) -> None:
    """A symlink must be relative and point inside the project directory."""
    if not target or os.path.isabs(target) or target.startswith("/"):
        raise SnapshotError(
            f"{full} is a symlink to the absolute path `{target}`: a snapshot keeps only "
            f"symlinks whose target is relative and inside {root}"
        )
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if joined == ".." or joined.startswith("../"):
        raise SnapshotError(
            f"{full} is a symlink to `{target}`, outside {root}: a snapshot keeps only symlinks "
            "that stay inside the project directory"
        )


def _list_git(base: str, prefix: str, entries: _Entries, skipped: List[str], root: str) -> None:
    out = _git_out(["ls-files", "-z", "--cached", "--others", "--exclude-standard"], base)
    # Unmerged paths are listed once per stage.
    for raw in sorted(set(p for p in out.split(b"\0") if p)):
        name = os.fsdecode(raw).rstrip("/")  # `nested/`: an untracked repository
        rel = posixpath.join(prefix, name) if prefix else name
        full = os.path.join(base, name)
        st = _add(entries, skipped, full, rel, root)
        if st is not None and stat.S_ISDIR(st.st_mode):
            # A submodule or a nested repository: its own files, from its own working tree. Not
            # checked out: an empty directory.
            top = git_toplevel(full)
            if top and os.path.realpath(top) == os.path.realpath(full):
                _list_git(full, rel, entries, skipped, root)


def _list_plain(base: str, entries: _Entries, skipped: List[str]) -> None:
    def fail(e: OSError):
        raise SnapshotError(f"cannot read {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
        rel_dir = os.path.relpath(dirpath, base)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        keep = []
        for d in dirnames:
            if d in _EXCLUDED_PLAIN:
                continue
            full = os.path.join(dirpath, d)
            rel = posixpath.join(rel_dir, d) if rel_dir else d
            if os.path.islink(full):
                _add(entries, skipped, full, rel, base)  # not followed
            else:
                entries.setdefault(rel, ("dir", None))
                _add_parents(entries, rel)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f in _EXCLUDED_PLAIN:  # a `.git` file: a worktree's or submodule's link
                continue
            rel = posixpath.join(rel_dir, f) if rel_dir else f
            _add(entries, skipped, os.path.join(dirpath, f), rel, base)


def _estimate(entries: _Entries) -> int:
    """The archive's size from the listing (long names counted), before reading any file."""

    def blocks(n: int) -> int:
        return (n + _BLOCK - 1) // _BLOCK * _BLOCK

    total = 2 * _BLOCK
    for rel, (kind, info) in entries.items():
        name = len(os.fsencode(rel)) + (1 if kind == "dir" else 0)
        total += _BLOCK
        if name > 100:
            total += _BLOCK + blocks(name + 1)
        if kind == "file":
            total += blocks(info[1])
        elif kind == "link" and len(os.fsencode(info)) > 100:
            total += _BLOCK + blocks(len(os.fsencode(info)) + 1)
    return (total + _RECORD - 1) // _RECORD * _RECORD


def _largest(entries: _Entries, n: int = 3) -> str:
    files = sorted(
        ((info[1], rel) for rel, (kind, info) in entries.items() if kind == "file"), reverse=True
    )[:n]
    return ", ".join(f"{rel} ({human_size(size)})" for size, rel in files)


# -- the archive ----------------------------------------------------------------------------


def snapshot_of(path: str, max_size: int = MAX_SNAPSHOT_BYTES) -> Snapshot:
    """The deterministic tar of the project directory `path` (see the module's doc).

    Raises SnapshotError naming the file at fault (an escaping symlink, an unreadable file),
    and SnapshotTooLarge, before reading any file where the listing already shows it, when the
    archive would be over `max_size` bytes.
    """
    base = os.path.abspath(os.fspath(path))
    if not os.path.isdir(base):
        raise SnapshotError(f"{base} is not a directory")
    if is_git_repository_dir(base):
        raise SnapshotError(
            f"{base} is a git repository (bare, or a .git directory), not a working tree"
        )
    entries: _Entries = {}
    skipped: List[str] = []
    top = git_toplevel(base)
    commit = dirty = None
    if top is not None:
        _list_git(base, "", entries, skipped, base)
        commit = _git_head(base)
        dirty = _git_dirty(base)
    else:
        _list_plain(base, entries, skipped)

    files = sum(1 for kind, _ in entries.values() if kind != "dir")
    if files == 0:
        why = " (everything in it is ignored by git, or untracked and ignored)" if top else ""
        raise SnapshotError(f"{base} has no files to send{why}")
    estimate = _estimate(entries)
    if estimate > max_size:
        raise SnapshotTooLarge(
            too_large_message(f"the snapshot of {base} ({files} files)", estimate, max_size, about=True)
            + f"; the largest files: {_largest(entries)}. Leave large files out of the project "
            "directory (.gitignore them in a git checkout) and fetch data from the job",
            estimate,
            max_size,
        )

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for rel in sorted(entries, key=os.fsencode):
            kind, info = entries[rel]
            ti = tarfile.TarInfo(rel)
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            data = None
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
            elif kind == "link":
                ti.type = tarfile.SYMTYPE
                ti.linkname = info
                ti.mode = 0o777
            else:
                full, _, executable = info
                try:
                    with open(full, "rb") as f:
                        content = f.read(max_size + 1)
                except OSError as e:
                    raise SnapshotError(f"cannot read {full}: {e.strerror or e}") from None
                ti.type = tarfile.REGTYPE
                ti.mode = 0o755 if executable else 0o644
                ti.size = len(content)
                data = io.BytesIO(content)
            tar.addfile(ti, data)
            if buf.tell() > max_size:  # a file grew since the listing
                raise SnapshotTooLarge(
                    too_large_message(f"the snapshot of {base}", buf.tell(), max_size, about=True)
                    + " and growing",
                    buf.tell(),
                    max_size,
                )
    raw = buf.getvalue()
    if len(raw) > max_size:
        raise SnapshotTooLarge(
            too_large_message(f"the snapshot of {base} ({files} files)", len(raw), max_size),
            len(raw),
            max_size,
        )
    return Snapshot(
        data=raw,
        files=files,
        path=base,
        commit=commit,
        dirty=dirty,
        git_root=top,
        skipped=tuple(skipped),
    )

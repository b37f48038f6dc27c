"""A small client for Runyard's HTTP API, standard library only.

    from runyard_client import Client
    c = Client()                       # RUNYARD_CONTROLLER / RUNYARD_TOKEN / RUNYARD_CA
    job = c.submit({"repo": "https://example.com/x.git", "script": "train.py"})
    c.follow_logs(job["id"]); print(c.wait(job["id"])["status"])

    snap = snapshot_of("path/to/project")          # a deterministic tar of a local directory
    c.submit({"repo": c.upload_snapshot(snap.data)["snapshot"], "script": "train.py"})

This module must not import mlflow: it is usable on its own.
"""

from runyard_client.client import (
    DEFAULT_CONTROLLER,
    FINISHED_STATUSES,
    STATUSES,
    Client,
    RunyardError,
    WaitTimeout,
)
from runyard_client.snapshot import (
    MAX_SNAPSHOT_BYTES,
    Snapshot,
    SnapshotError,
    SnapshotTooLarge,
    snapshot_of,
)

__all__ = [
    "Client",
    "RunyardError",
    "WaitTimeout",
    "Snapshot",
    "SnapshotError",
    "SnapshotTooLarge",
    "snapshot_of",
    "MAX_SNAPSHOT_BYTES",
    "DEFAULT_CONTROLLER",
    "FINISHED_STATUSES",
    "STATUSES",
]

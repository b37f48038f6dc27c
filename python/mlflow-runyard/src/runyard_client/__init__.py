"""A small client for Runyard's HTTP API, standard library only.

    from runyard_client import Client
    c = Client()                       # RUNYARD_CONTROLLER / RUNYARD_TOKEN / RUNYARD_CA
    job = c.submit({"repo": "https://example.com/x.git", "script": "train.py"})
    c.follow_logs(job["id"]); print(c.wait(job["id"])["status"])

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

__all__ = [
    "Client",
    "RunyardError",
    "WaitTimeout",
    "DEFAULT_CONTROLLER",
    "FINISHED_STATUSES",
    "STATUSES",
]

"""MLflow project backend that runs projects as Runyard jobs: `mlflow run URI --backend runyard`.

The backend is registered under the `mlflow.project_backend` entry point group as `runyard`
(see pyproject.toml); MLflow instantiates `mlflow_runyard.backend.RunyardBackend` with no
arguments and calls its `run(...)`.
"""

from mlflow_runyard.backend import RunyardBackend, RunyardSubmittedRun

__all__ = ["RunyardBackend", "RunyardSubmittedRun"]

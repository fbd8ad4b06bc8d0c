"""The `tracking:` section: MLflow and Weights & Biases runs for `dlray train`, `dlray tune` and `dlray export`.

    dlray train jobs/cnn_digits.yaml tracking.mlflow.experiment_name=digits tracking.wandb.mode=offline

Both are off unless their sub-section is set (`tracking.mlflow={}` turns MLflow on with its defaults).
Credentials never go here: MLflow and W&B read them from the environment (MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD, WANDB_API_KEY), and dlray passes those to Ray's processes.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import field_validator

from dlray.config.sections import Section


class MLflowSection(Section):
    """As MLflow's `MlflowClient(tracking_uri)` and `start_run(experiment_id, run_name, parent_run_id)` take them."""

    # None: MLFLOW_TRACKING_URI, else a local store beside the runs (sqlite:///<run.storage_path>/mlflow.db)
    tracking_uri: str | None = None
    experiment_name: str = "dlray"
    parent_run_id: str | None = None  # nest this run under another; `dlray tune` sets it to the sweep's run

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and (urlsplit(uri).password or urlsplit(uri).username):
            raise ValueError("tracking.mlflow.tracking_uri must not hold credentials (a job config is logged and shared): "
                             "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the environment")
        return uri


class WandbSection(Section):
    """As `wandb.init(project, entity, mode, group)` takes them."""

    project: str = "dlray"
    entity: str | None = None  # None: WANDB_ENTITY, else the API key's default entity
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under the run directory, `wandb sync` later
    group: str | None = None  # `dlray tune` sets it to the sweep's name


class TrackingSection(Section):
    mlflow: MLflowSection | None = None
    wandb: WandbSection | None = None

"""The ``tracking`` section: where runs are tracked, and how models are registered and promoted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mvtcae.config.base import Section


class TrackingSection(Section):
    """Where and how runs are tracked, and how trained models are registered and promoted."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db",
    )
    experiment_name: str = "mvtcae"
    artifact_location: str | None = Field(
        default=None,
        description="artifact root for a new experiment; None next to a SQLite store: <db dir>/mlartifacts",
    )
    registered_model_name: str | None = Field(
        default="mvtcae", description="registry name; None logs the model without registering it"
    )
    promotion_metric: str = "eval/joint_nll"
    promotion_mode: Literal["min", "max"] = "min"
    log_model: bool = True
    system_metrics_interval_s: float = Field(
        default=10.0,
        ge=0.0,
        description="the first training worker on every node samples its machine's CPU, memory, "
        "disk, network (and GPU) every this many seconds into the run as system/rank<k>/... "
        "(MLflow's system metrics; k: that worker's rank); 0: off",
    )
    outage_grace_s: float = Field(
        default=120.0,
        ge=0.0,
        description="how long training keeps retrying an unreachable MLflow for the calls it "
        "cannot do without (starting the run, registering the model); metrics are buffered",
    )

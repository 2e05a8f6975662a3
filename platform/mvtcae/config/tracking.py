"""The ``tracking`` section: where runs are tracked, and how models are registered and promoted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from mvtcae.config.base import Section

REGISTRY_NAME_FORBIDDEN = ("/", ":", "'")


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
        default=None,
        description="registry name, holding the models of one dataset; not set: the experiment's "
        "name (experiment_name); null: log the model without registering it (as in MLflow)",
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

    @field_validator("registered_model_name")
    @classmethod
    def _registrable(cls, name: str | None) -> str | None:
        """A name MLflow can register and the registry's search filters can quote."""
        _check_registry_name(name, "registered_model_name")
        return name

    @model_validator(mode="after")
    def _registered_name_defaults_to_the_experiment(self) -> TrackingSection:
        """A registered name not given is the experiment's; an explicit null turns registering
        off."""
        # Written past validation so that it stays "not given": a later experiment_name
        # (validate_assignment re-runs this) still carries the registered name along.
        if "registered_model_name" not in self.model_fields_set:
            _check_registry_name(self.experiment_name, "experiment_name (the registered name)")
            self.__dict__["registered_model_name"] = self.experiment_name
        return self


def _check_registry_name(name: str | None, field: str) -> None:
    # MLflow refuses '/' and ':' only when registering, after training; a quote would break
    # the registry's search filters.
    if name and any(c in name for c in REGISTRY_NAME_FORBIDDEN):
        raise ValueError(
            f"{field} {name!r}: a registered model name cannot hold / : or '; set "
            "tracking.registered_model_name to a name without them, or to null to log the "
            "model without registering it"
        )

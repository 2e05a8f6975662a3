"""The plain-text summary a training run prints: metrics, MLflow run, model version, where to look."""

from __future__ import annotations

from mvtcae import storage
from mvtcae.safety.redaction import redact_text
from mvtcae.storage.console import LOG_DIR
from mvtcae.training.lifecycle import TrainResult


def format_summary(result: TrainResult) -> str:
    """A plain-text table of the run's metrics, MLflow run, model version and how to look at it."""
    rows: list[tuple[str, str]] = [
        ("Ray run", result.run_name),
        ("run directory", str(result.run_dir)),
    ]
    rows.append(("MLflow run", str(result.run_id)))
    rows.append(("tracking URI", redact_text(str(result.tracking_uri))))
    for key in ("epoch", "train/loss", "val/loss", "perf/samples_per_s", "perf/epoch_time_s"):
        if key in result.final_metrics:
            rows.append((f"final {key}", f"{result.final_metrics[key]:.4g}"))
    if result.best_checkpoint is not None:
        rows.append(("best checkpoint", str(result.best_checkpoint)))
    for key, value in sorted(result.eval_metrics.items()):
        rows.append((key, f"{value:.4g}"))
    if result.trend_plot is not None:
        rows.append(("trend plot", f"{result.trend_plot}  (MLflow: evaluation/plots/trend.png)"))
    rows.append(("log files", f"{storage.join(result.run_dir, LOG_DIR)}  (MLflow: {LOG_DIR}/)"))
    reg = result.registered
    if reg is not None:
        rows.append(("registered model", f"{reg.name} v{reg.version}"))
        rows.append(("alias", f"{reg.alias} ({'promoted' if reg.promoted else 'not promoted'})"))
    rows.append(("wall time", f"{result.wall_time_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    uri = redact_text(result.tracking_uri or "")
    if uri.startswith("sqlite"):
        lines.append(
            f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
        )
    elif uri:
        lines.append(f"MLflow UI: {uri}")
    return "\n".join(lines)

"""The plain-text summary a sweep prints: trials, best trial, front, registry, where to look."""

from __future__ import annotations

from typing import Any

from mvtcae.safety.redaction import redact_text
from mvtcae.sweep.sweep_driver import SweepResult


def format_sweep_summary(result: SweepResult) -> str:
    """A plain-text table of the sweep's trials, best trial, front and registry outcome."""
    lines = [
        f"study            {result.study_name}  ({redact_text(result.storage)})",
        f"sweep directory  {result.experiment_dir}",
        f"MLflow parent    {result.parent_run_id}  ({redact_text(result.tracking_uri)})",
        f"state            {'finished' if result.finished else 'interrupted: continue with --resume'}",
        f"wall time        {result.wall_time_s:.1f} s (trials summed {result.trial_time_s:.1f} s)",
        "",
        f"{'#':>3}  {'state':9} {'values':28} params",
    ]
    for row in result.trials:
        values = "-" if row["values"] is None else ", ".join(f"{v:.5g}" for v in row["values"])
        params = ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        lines.append(f"{row['number']:>3}  {row['state']:9} {values:28} {params}")
    if result.best is not None:
        lines.append("")
        lines.append(f"best trial       #{result.best['number']}  values {result.best['values']}")
        lines.append(f"best run         {result.best['mlflow_run_id']}")
    if len(result.pareto_front) > 1 or (result.pareto_front and result.best is None):
        numbers = ", ".join(f"#{r['number']}" for r in result.pareto_front)
        lines.append(f"Pareto front     {numbers}")
    if result.registered is not None:
        reg = result.registered
        lines.append(f"registered       {reg.name} v{reg.version} -> {reg.alias}")
    infra = [r for r in result.trials if (r.get("failure") or "").startswith("infrastructure")]
    if infra:
        numbers = ", ".join(f"#{r['number']}" for r in infra)
        lines.append(
            f"infrastructure   {len(infra)} trial(s) failed for infrastructure reasons "
            f"({numbers}); their parameters were run again and they do not count against "
            "tune.num_samples"
        )
    lines.append("")
    lines.append(f"optuna-dashboard {redact_text(result.storage)}  (--host 127.0.0.1)")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

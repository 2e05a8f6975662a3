"""``mvtcae tune``: search MVTCAE's loss weights with Ray Tune + Optuna, tracked in MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mvtcae.cli.outcome import config_options, handles_failures, quiet_libraries


@click.command("tune")
@config_options(
    "Tune YAML: `base:` experiment config plus a `tune:` section (default: built-in).",
    "e.g. tune.num_samples=4 sets the tune section, train.epochs=3 the base experiment.",
)
@click.option("--resume", is_flag=True, help="Continue the interrupted sweep of this study name.")
@click.option("--print-config", is_flag=True, help="Print the validated sweep config and exit.")
@handles_failures(resumable=True)
def tune_command(
    config_path: Path | None, overrides: tuple[str, ...], resume: bool, print_config: bool
) -> None:
    """Run a Ray Tune + Optuna sweep, log it to MLflow and register the best model.

    The console shows a header, each trial's epochs, warnings and errors, and a summary;
    Tune's status tables and Ray's, MLflow's and Optuna's INFO lines only with --verbose.
    """
    import yaml

    from mvtcae.config import load_sweep_config

    spec = load_sweep_config(config_path, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(spec.to_dict(), sort_keys=False), nl=False)
        return
    quiet_libraries("ray", "mlflow", "optuna")
    from mvtcae.sweep import format_sweep_summary, run_sweep

    result = run_sweep(spec, resume=resume or spec.tune.resume)
    click.echo("\n" + "=" * 30 + " MVTCAE sweep summary " + "=" * 30)
    click.echo(format_sweep_summary(result))
    sys.stdout.flush()

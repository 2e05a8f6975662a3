"""``mvtcae train``: train (or resume) a run from a YAML config, then evaluate and register it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mvtcae.cli.outcome import config_options, handles_failures, quiet_libraries


@click.command("train")
@config_options(
    "Experiment YAML (default: the embedded demo defaults).", "e.g. --set train.epochs=3."
)
@click.option("--resume", is_flag=True, help="Continue the latest run of this config's name.")
@click.option("--print-config", is_flag=True, help="Print the validated config and exit.")
@handles_failures(resumable=True)
def train_command(
    config_path: Path | None, overrides: tuple[str, ...], resume: bool, print_config: bool
) -> None:
    """Train MVTCAE on Ray Train, evaluate the best checkpoint and register it in MLflow.

    The console shows a header, one line per epoch, warnings and errors, and a summary; Ray's
    and MLflow's INFO lines go to the run's log (<run directory>/logs, and the MLflow run's
    logs/ artifacts), and to the console too with --verbose.

    Ctrl-C (or SIGTERM) stops the run's workers and ends its MLflow run KILLED; the same
    command with --resume continues it from its newest checkpoint.
    """
    from mvtcae.config import load_config

    cfg = load_config(config_path, list(overrides))
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    quiet_libraries("ray", "mlflow")
    from mvtcae.training import format_summary, train

    result = train(cfg, resume=resume)
    click.echo("\n" + "=" * 30 + " MVTCAE training summary " + "=" * 30)
    click.echo(format_summary(result))
    sys.stdout.flush()

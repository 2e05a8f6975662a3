"""``mvtcae train``: train (or resume) a run from a YAML config, then evaluate and register it."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Experiment YAML (default: the embedded demo defaults).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Override a config value (repeatable), e.g. --set train.epochs=3.",
)
@click.option("--resume", is_flag=True, help="Continue the latest run of this config's name.")
@click.option("--print-config", is_flag=True, help="Print the validated config and exit.")
def train_command(
    config_path: Path | None, overrides: tuple[str, ...], resume: bool, print_config: bool
) -> None:
    """Train MVTCAE on Ray Train, evaluate the best checkpoint and register it in MLflow."""
    from mvtcae.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    from mvtcae.training import format_summary, train

    result = train(cfg, resume=resume)
    click.echo("\n" + "=" * 30 + " MVTCAE training summary " + "=" * 30)
    click.echo(format_summary(result))
    sys.stdout.flush()

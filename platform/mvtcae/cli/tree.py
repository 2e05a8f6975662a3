"""The click tree of the ``mvtcae`` command: ``mvtcae train | tune | evaluate | lineage | data | cluster``."""

from __future__ import annotations

import click

from mvtcae.cli.cluster import cluster_command
from mvtcae.cli.data import data as data_command
from mvtcae.cli.evaluate import evaluate_command
from mvtcae.cli.lineage import lineage_command
from mvtcae.cli.logs import configure_logging
from mvtcae.cli.train import train_command
from mvtcae.cli.tune import tune_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvtcae-platform")
def main() -> None:
    """Train, tune, evaluate and ship MVTCAE multimodal VAEs on Ray, tracked in MLflow."""
    configure_logging()


main.add_command(data_command)
main.add_command(train_command)
main.add_command(tune_command)
main.add_command(evaluate_command)
main.add_command(lineage_command)
main.add_command(cluster_command)

"""The click tree of the ``mvtcae`` command: ``mvtcae train | tune | evaluate | lineage | data | cluster``."""

from __future__ import annotations

import logging
import sys

import click

from mvtcae.cli.cluster import cluster_command
from mvtcae.cli.data import data as data_command
from mvtcae.cli.evaluate import evaluate_command
from mvtcae.cli.lineage import lineage_command
from mvtcae.cli.train import train_command
from mvtcae.cli.tune import tune_command


def configure_logging(level: int = logging.INFO) -> None:
    """Show the platform's log lines (``[mvtcae.<package>] ...``) on stderr."""
    package = logging.getLogger("mvtcae")
    if any(getattr(h, "name", "") == "mvtcae-cli" for h in package.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.name = "mvtcae-cli"
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(level)


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

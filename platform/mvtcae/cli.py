"""The ``mvtcae`` command: thin wrappers over the platform's functions."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mvtcae-platform")
def main() -> None:
    """Train, tune, evaluate and ship MVTCAE multimodal VAEs on Ray, tracked in MLflow."""


# Sub-command groups register here, one line each (imports stay inside each group's module).
from mvtcae.data.cli import data as _data  # noqa: E402

main.add_command(_data)
from mvtcae.commands.train import train_command as _train  # noqa: E402

main.add_command(_train)
from mvtcae.commands.tune import tune_command as _tune  # noqa: E402

main.add_command(_tune)
from mvtcae.commands.evaluate import evaluate_command as _evaluate  # noqa: E402

main.add_command(_evaluate)

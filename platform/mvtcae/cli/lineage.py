"""``mvtcae lineage``: a registered model traced back to its run, config and dataset."""

from __future__ import annotations

from pathlib import Path

import click

from mvtcae.cli.outcome import config_options, handles_failures


@click.command("lineage")
@click.argument("model_uri", metavar="MODEL_URI")
@config_options(
    "Experiment YAML whose tracking section applies (default: built-in defaults).",
    "e.g. --set tracking.tracking_uri=http://...",
)
@click.option(
    "--verify-files/--no-verify-files",
    default=True,
    show_default=True,
    help="Also re-hash every shard at the dataset's source (off: compare the manifest only).",
)
@handles_failures(usage_errors=("mvtcae.tracking.dataset_lineage.LineageError",))
def lineage_command(
    model_uri: str, config_path: Path | None, overrides: tuple[str, ...], verify_files: bool
) -> None:
    """Print the chain model version -> run -> config -> dataset of MODEL_URI
    (models:/NAME@ALIAS or models:/NAME/VERSION) and whether the dataset at its source still
    matches the one the model was trained on. Exits with 1 when it does not."""
    from mvtcae.config import load_config

    cfg = load_config(config_path, list(overrides))
    from mvtcae import tracking
    from mvtcae.tracking.dataset_lineage import format_lineage, trace

    found = trace(model_uri, tracking.client_for(cfg.tracking), verify_files=verify_files)
    click.echo(format_lineage(found))
    if found.dataset_matches is False:
        raise SystemExit(1)

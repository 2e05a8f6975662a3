"""The training job: `python jobs/train.py` runs the demo config (configs/demo.yaml).

Local Ray (or RAY_ADDRESS / `ray job submit`), a SQLite MLflow store in the working directory
unless MLFLOW_TRACKING_URI says otherwise, and the dataset prepared into data/ when missing.
The options are `mvtcae train`'s: --config, --set section.field=value, --resume, --verbose.
"""

from __future__ import annotations

from pathlib import Path

from mvtcae.cli.job_entry import run_as_job
from mvtcae.cli.train import train_command

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    """`mvtcae train`, with the demo config unless --config is given."""
    run_as_job(train_command, DEMO_CONFIG, "python jobs/train.py", argv)


if __name__ == "__main__":
    main()

"""The sweep job: `python jobs/tune.py` runs the demo loss-weight sweep (configs/tune_demo.yaml).

Local Ray (or RAY_ADDRESS / `ray job submit`), the Optuna study in outputs/optuna.db, MLflow as
configured in the base experiment. The options are `mvtcae tune`'s: --config, --set, --resume,
--verbose.
"""

from __future__ import annotations

from pathlib import Path

from mvtcae.cli.job_entry import run_as_job
from mvtcae.cli.tune import tune_command

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "tune_demo.yaml"


def main(argv: list[str] | None = None) -> None:
    """`mvtcae tune`, with the demo sweep unless --config is given."""
    run_as_job(tune_command, DEMO_CONFIG, "python jobs/tune.py", argv)


if __name__ == "__main__":
    main()

"""The training job: `python jobs/train.py` runs the demo config on embedded defaults.

Local Ray (or RAY_ADDRESS / `ray job submit`), a SQLite MLflow store in the working directory
unless MLFLOW_TRACKING_URI says otherwise, and the dataset prepared into data/ when missing.
Same options as `mvtcae train`: --config, --set section.field=value, --resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    """Run `mvtcae train`, with the demo config unless --config is given."""
    from mvtcae.cli.train import train_command

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", str(DEMO_CONFIG), *args]
    train_command.main(args=args, prog_name="python jobs/train.py", standalone_mode=True)


if __name__ == "__main__":
    main()

"""The sweep job: `python jobs/tune.py` runs the demo loss-weight sweep (tune_demo.yaml).

Local Ray (or RAY_ADDRESS / `ray job submit`), the Optuna study in outputs/optuna.db, MLflow as
configured in the base experiment. Same options as `mvtcae tune`: --config, --set, --resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "tune_demo.yaml"


def main(argv: list[str] | None = None) -> None:
    """Run `mvtcae tune`, with the demo sweep unless --config is given."""
    from mvtcae.cli.tune import tune_command

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", str(DEMO_CONFIG), *args]
    tune_command.main(args=args, prog_name="jobs/tune.py", standalone_mode=True)


if __name__ == "__main__":
    main()

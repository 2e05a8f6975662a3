"""Searching MVTCAE's loss weights: Ray Tune trials driven by an Optuna study, tracked in MLflow.

`run_sweep` runs a `mvtcae.config.SweepSpec` (`load_sweep_config`); `format_sweep_summary` prints
its outcome. The modules: ``sweep_driver`` (the Tuner, the parent run, registration), ``trial``
(one trial: a child run through the platform's run lifecycle, `mvtcae.training.lifecycle`),
``study`` (the Optuna study, its searcher, front and plots) and ``sweep_summary``.
"""

from mvtcae.sweep.sweep_driver import SweepResult, run_sweep
from mvtcae.sweep.sweep_summary import format_sweep_summary

__all__ = ["SweepResult", "format_sweep_summary", "run_sweep"]

"""Evaluation of a trained MVTCAE: latent probe, coherence, likelihood, plots.

`evaluate` measures a model on a dataset split; `evaluate_checkpoint` is the one way the
platform evaluates a checkpoint in run storage (training's final evaluation, a sweep trial's).
"""

from mvtcae.evaluation.report import EvalReport, evaluation_cost
from mvtcae.evaluation.suite import evaluate, evaluate_checkpoint

__all__ = ["EvalReport", "evaluate", "evaluate_checkpoint", "evaluation_cost"]

"""Evaluation of a trained MVTCAE: latent probe, coherence, likelihood, plots.

`evaluate` measures a model on a dataset split; `evaluate_checkpoint` is the one way the
platform evaluates a checkpoint in run storage (training's final evaluation, a sweep trial's).
"""

from mvtcae.evaluation.evaluate import evaluate, evaluate_checkpoint
from mvtcae.evaluation.report import EvalReport, evaluation_cost

__all__ = ["EvalReport", "evaluate", "evaluate_checkpoint", "evaluation_cost"]

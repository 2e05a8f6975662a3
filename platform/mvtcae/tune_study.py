"""The Optuna side of a sweep: the searcher, the study's storage, its Pareto front and plots."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from mvtcae.redaction import redact_text
from mvtcae.tune_trial import FAILURE_KEY, FAILURE_KIND_KEY, INFRASTRUCTURE

TUNE_TRIAL_ATTR = "tune_trial_id"
RUN_ID_ATTR = "mlflow_run_id"
FAILURE_ATTR = "failure"
# The study storages this process opened, by their URL with credentials masked. A storage
# pickles (into Tune's tuner.pkl and searcher state) as a lookup here by that key, never as
# its URL, which may hold a password; a resumed sweep opens the storage again first.
_STORAGES: dict[str, Any] = {}


def open_storage(url: str) -> Any:
    """An Optuna RDB storage for a SQLAlchemy URL (creating a SQLite file's folder), registered
    in this process so that pickling it writes no credential."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///").split("?", 1)[0]).parent.mkdir(
            parents=True, exist_ok=True
        )
    storage = _SweepStorage(url, engine_kwargs=_engine_kwargs(url))
    _STORAGES[storage.key] = storage
    return storage


def registered_storage(key: str) -> Any:
    """The storage this process opened for the (masked) URL ``key``."""
    try:
        return _STORAGES[key]
    except KeyError:
        raise RuntimeError(
            f"no open study storage {key!r} in this process: open_storage(url) must run before "
            "a saved searcher is restored"
        ) from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    # Tune's driver and optuna-dashboard read while the driver writes: wait instead of failing.
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


class _SweepStorage(optuna.storages.RDBStorage):
    """An RDBStorage that pickles as a reference to this process's open storage."""

    @property
    def key(self) -> str:
        """The storage URL with credentials masked."""
        return redact_text(self.url)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return registered_storage, (self.key,)


class RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that records errored or non-finite trials as FAIL and links trial ids.

    A trial that failed for an infrastructure reason (``mvtcae/failure_kind``) is recorded as
    FAIL with that reason, its parameters are queued to run again, and it does not count
    against ``budget``: suggestions stop once ``budget`` trials have run on their merits.
    """

    def __init__(self, *args: Any, budget: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.infra_failures = 0
        self._failure_kinds: dict[str, tuple[str, str]] = {}

    def suggest(self, trial_id: str) -> dict | None:
        """The next parameters; None while the budget is met but trials may still fail for
        infrastructure reasons, FINISHED once it is met and none runs."""
        if self.budget is not None and len(self._ot_trials) - self.infra_failures >= self.budget:
            running = set(self._ot_trials) - set(self._completed_trials)
            return None if running else Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Remember a failure kind; pass finite intermediate values on to Optuna."""
        if result.get(FAILURE_KIND_KEY):
            self._failure_kinds[trial_id] = (result[FAILURE_KIND_KEY], result.get(FAILURE_KEY, ""))
            return
        values = self._values(result)
        if values is not None and all(math.isfinite(v) for v in values):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Tell the study how the trial ended; failures never become COMPLETE with a stale value."""
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        self._link(ot_trial, trial_id, result or {})
        kind, detail = self._failure_kinds.get(trial_id, ("", ""))
        if error and kind == INFRASTRUCTURE:
            self._fail(ot_trial, f"{INFRASTRUCTURE}: {detail}")
            self._ot_study.enqueue_trial(ot_trial.params)
            self.infra_failures += 1
            self._completed_trials.add(trial_id)
            return
        values = self._values(result)
        if error or values is None or not all(math.isfinite(v) for v in values):
            reason = "trial raised" if error else f"objective not finite: {values}"
            self._fail(ot_trial, reason)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def _values(self, result: dict | None) -> list[float] | None:
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        if not result or any(result.get(m) is None for m in metrics):
            return None
        return [float(result[m]) for m in metrics]

    def _link(self, ot_trial: Any, trial_id: str, result: dict) -> None:
        ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        if result.get(RUN_ID_ATTR):
            ot_trial.set_user_attr(RUN_ID_ATTR, str(result[RUN_ID_ATTR]))

    def _fail(self, ot_trial: Any, reason: str) -> None:
        import optuna

        ot_trial.set_user_attr(FAILURE_ATTR, reason)
        self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)


def build_searcher(spec: Any, storage: Any) -> RecordingOptunaSearch:
    """The seeded Optuna searcher (TPE, or random for baselines) over the YAML search space."""
    import optuna

    tc = spec.tune
    sampler = (
        optuna.samplers.TPESampler(seed=tc.seed, n_startup_trials=tc.tpe_startup_trials)
        if tc.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=tc.seed)
    )
    multi = tc.multi_objective
    return RecordingOptunaSearch(
        space={name: p.to_optuna() for name, p in tc.space.items()},
        metric=tc.metrics if multi else tc.metrics[0],
        mode=tc.modes if multi else tc.modes[0],
        points_to_evaluate=[dict(p) for p in tc.points_to_evaluate] or None,
        sampler=sampler,
        study_name=spec.study_name,
        storage=storage,
        budget=tc.num_samples,
    )


def fail_orphans(study: Any) -> int:
    """Mark trials left RUNNING by an interrupted driver as FAIL; return how many."""
    import optuna

    orphans = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING
    ]
    for t in orphans:
        study._storage.set_trial_user_attr(
            t._trial_id, FAILURE_ATTR, "left running by an interrupted sweep"
        )
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)


def count_finished(study: Any) -> int:
    """Trials that reached COMPLETE, PRUNED or FAIL."""
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def is_infrastructure_failure(trial: Any) -> bool:
    """Whether a study trial failed for an infrastructure reason (and was run again)."""
    return str(trial.user_attrs.get(FAILURE_ATTR, "")).startswith(INFRASTRUCTURE)


def sweep_done(study: Any, budget: int, replacements: int) -> bool:
    """Whether ``budget`` trials finished on their merits, or every allowed trial finished."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    infra = sum(is_infrastructure_failure(t) for t in finished)
    return len(finished) - infra >= budget or len(finished) >= budget + replacements


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per study trial: number, state, values, params and links."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "values": list(t.values) if t.values is not None else None,
            "params": dict(t.params),
            "tune_trial_id": t.user_attrs.get(TUNE_TRIAL_ATTR),
            "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR),
            "failure": t.user_attrs.get(FAILURE_ATTR),
        }
        for t in study.get_trials(deepcopy=False)
    ]


def pareto_front(study: Any) -> list[dict[str, Any]]:
    """The non-dominated complete trials (Optuna's ``best_trials``), as trial rows."""
    numbers = {t.number for t in study.best_trials}
    return [row for row in trial_rows(study) if row["number"] in numbers]


def best_row(study: Any, modes: list[str]) -> dict[str, Any] | None:
    """The best trial; with several objectives, the front's best on the first objective."""
    front = pareto_front(study)
    if not front:
        return None
    sign = 1.0 if modes[0] == "min" else -1.0
    return min(front, key=lambda row: sign * row["values"][0])


def save_study_plots(study: Any, metrics: list[str], out_dir: Path) -> dict[str, Path]:
    """Optimisation history, parameter importances, α–β contour (and Pareto front) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    target = (lambda t: t.values[0]) if len(metrics) > 1 else None
    kwargs = {"target": target, "target_name": metrics[0]}
    params = set(study.best_trials[0].params) if study.best_trials else set()
    plots = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, **kwargs),
        "param_importances": lambda: ovm.plot_param_importances(study, **kwargs),
    }
    if {"model.alpha", "model.beta"} <= params:
        plots["contour_alpha_beta"] = lambda: ovm.plot_contour(
            study, params=["model.alpha", "model.beta"], **kwargs
        )
    if len(metrics) > 1:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=metrics)
    return {
        name: path for name, draw in plots.items() if (path := _save(draw, out_dir / f"{name}.png"))
    }


def _save(draw: Any, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = draw()
    except Exception as err:  # too few finished trials for this plot
        print(f"[mvtcae.tune] skipped {path.name}: {type(err).__name__}: {err}")
        return None
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

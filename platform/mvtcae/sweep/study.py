"""The Optuna side of a sweep: the study's storage, the searcher, its Pareto front and plots."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher

from mvtcae.safety.redaction import redact_text
from mvtcae.sweep.trial import FAILURE_KEY, FAILURE_KIND_KEY, INFRASTRUCTURE

logger = logging.getLogger(__name__)

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


class StudySearcher(Searcher):
    """A Ray Tune searcher over an Optuna study, through Optuna's ask-and-tell API.

    Suggestions are ``study.ask`` draws (queued points first); every trial's end is told to the
    study with ``study.tell``: COMPLETE with its objective values, or FAIL with the reason in its
    ``failure`` attribute (raised, non-finite, infrastructure). A trial that failed for an
    infrastructure reason (``mvtcae/failure_kind``) has its parameters queued again and does not
    count against ``budget``: suggestions stop once ``budget`` trials ran on their merits.

    Pickled (Tune keeps the searcher in its experiment state) it holds no storage URL and no
    live study: it reattaches to the study through this process's registered storage.
    """

    def __init__(
        self,
        space: dict[str, Any],
        metrics: list[str],
        modes: list[str],
        *,
        study_name: str,
        storage: Any,
        sampler: Any,
        points_to_evaluate: list[dict[str, Any]] | None = None,
        budget: int | None = None,
    ) -> None:
        multi = len(metrics) > 1
        super().__init__(metric=metrics if multi else metrics[0], mode=modes if multi else modes[0])
        self.space = dict(space)
        self.metrics = list(metrics)
        self.budget = budget
        self.study_name = study_name
        self.storage_key = storage.key
        self.sampler = sampler
        self.numbers: dict[str, int] = {}
        self.finished: set[str] = set()
        self.infra_failures = 0
        self.failure_kinds: dict[str, tuple[str, str]] = {}
        self._live: dict[str, optuna.trial.Trial] = {}
        self._study: optuna.Study | None = None
        directions = ["minimize" if m == "min" else "maximize" for m in modes]
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            directions=directions,
            load_if_exists=True,
        )
        if not study.trials:
            for point in points_to_evaluate or []:
                study.enqueue_trial(point)
        self._study = study

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (loaded from the registered storage after unpickling)."""
        if self._study is None:
            self._study = optuna.load_study(
                study_name=self.study_name,
                storage=registered_storage(self.storage_key),
                sampler=self.sampler,
            )
        return self._study

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = None
        state["_live"] = {}
        return state

    # -- Tune's Searcher interface -----------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        """The next parameters; None while the budget is met but trials may still fail for
        infrastructure reasons, FINISHED once it is met and none runs."""
        if self.budget is not None and len(self.numbers) - self.infra_failures >= self.budget:
            running = set(self.numbers) - self.finished
            return None if running else Searcher.FINISHED
        trial = self.study.ask(fixed_distributions=self.space)
        self._live[trial_id] = trial
        self.numbers[trial_id] = trial.number
        trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Remember a failure kind; report finite intermediate values (single objective)."""
        if result.get(FAILURE_KIND_KEY):
            self.failure_kinds[trial_id] = (result[FAILURE_KIND_KEY], result.get(FAILURE_KEY, ""))
            return
        trial = self._live.get(trial_id)
        if trial is not None and result.get(RUN_ID_ATTR) and RUN_ID_ATTR not in trial.user_attrs:
            link_run(self.study, trial.number, str(result[RUN_ID_ATTR]), trial)
        values = self._values(result)
        if trial is None or len(self.metrics) > 1 or values is None or not _finite(values):
            return
        step = int(result.get("training_iteration", 0))
        trial.report(values[0], step)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Tell the study how the trial ended; failures never become COMPLETE."""
        if trial_id in self.finished or trial_id not in self.numbers:
            return
        self.finished.add(trial_id)
        number, trial = self.numbers[trial_id], self._live.pop(trial_id, None)
        if result and result.get(RUN_ID_ATTR):
            link_run(self.study, number, str(result[RUN_ID_ATTR]), trial)
        kind, detail = self.failure_kinds.get(trial_id, ("", ""))
        values = self._values(result)
        if error and kind == INFRASTRUCTURE:
            params = trial.params if trial is not None else self._params(number)
            self._fail(number, trial, f"{INFRASTRUCTURE}: {detail}")
            self.study.enqueue_trial(params)  # the same point runs again
            self.infra_failures += 1
        elif error or values is None or not _finite(values):
            self._fail(
                number, trial, "trial raised" if error else f"objective not finite: {values}"
            )
        else:
            self.study.tell(trial if trial is not None else number, values)

    def save(self, checkpoint_path: str) -> None:
        """The searcher's bookkeeping as JSON (the study itself lives in its storage)."""
        state = {
            "numbers": self.numbers,
            "finished": sorted(self.finished),
            "infra_failures": self.infra_failures,
            "failure_kinds": self.failure_kinds,
        }
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        """Read the bookkeeping written by `save`."""
        state = json.loads(Path(checkpoint_path).read_text())
        self.numbers = {k: int(v) for k, v in state["numbers"].items()}
        self.finished = set(state["finished"])
        self.infra_failures = int(state["infra_failures"])
        self.failure_kinds = {k: tuple(v) for k, v in state["failure_kinds"].items()}

    # -- helpers ---------------------------------------------------------------------------
    def _values(self, result: dict | None) -> list[float] | None:
        if not result or any(result.get(m) is None for m in self.metrics):
            return None
        return [float(result[m]) for m in self.metrics]

    def _params(self, number: int) -> dict[str, Any]:
        return dict(self.study.get_trials(deepcopy=False)[number].params)

    def _fail(self, number: int, trial: Any, reason: str) -> None:
        record_failure(self.study, number, reason, trial)
        self.study.tell(trial if trial is not None else number, state=optuna.trial.TrialState.FAIL)


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def build_searcher(spec: Any, storage: Any) -> StudySearcher:
    """The seeded searcher (TPE, or random for baselines) over the YAML search space."""
    tc = spec.tune
    sampler = (
        optuna.samplers.TPESampler(seed=tc.seed, n_startup_trials=tc.tpe_startup_trials)
        if tc.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=tc.seed)
    )
    return StudySearcher(
        {name: p.to_optuna() for name, p in tc.space.items()},
        tc.metrics,
        tc.modes,
        study_name=spec.study_name,
        storage=storage,
        sampler=sampler,
        points_to_evaluate=[dict(p) for p in tc.points_to_evaluate],
        budget=tc.num_samples,
    )


def fail_orphans(study: Any) -> int:
    """Mark trials left RUNNING by an interrupted driver as FAIL; return how many."""
    orphans = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING
    ]
    for t in orphans:
        record_failure(study, t.number, "left running by an interrupted sweep")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


def count_finished(study: Any) -> int:
    """Trials that reached COMPLETE, PRUNED or FAIL."""
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def failure_of(study: Any, trial: Any) -> str | None:
    """Why a study trial failed, as recorded by the searcher or the sweep driver (or None)."""
    return trial.user_attrs.get(FAILURE_ATTR) or study.user_attrs.get(
        f"{FAILURE_ATTR}.{trial.number}"
    )


def record_failure(study: Any, number: int, reason: str, trial: Any = None) -> None:
    """Record why trial ``number`` failed: on the trial while it runs, else on the study."""
    if trial is not None:
        trial.set_user_attr(FAILURE_ATTR, reason)
    else:
        study.set_user_attr(f"{FAILURE_ATTR}.{number}", reason)


def link_run(study: Any, number: int, run_id: str, trial: Any = None) -> None:
    """Link trial ``number`` to its MLflow run: on the trial while this process holds it, else
    on the study (a sweep resumed after an interruption no longer holds its running trials)."""
    if trial is not None:
        trial.set_user_attr(RUN_ID_ATTR, run_id)
    else:
        study.set_user_attr(f"{RUN_ID_ATTR}.{number}", run_id)


def run_id_of(study: Any, trial: Any) -> str | None:
    """The MLflow run of a study trial, wherever `link_run` recorded it (or None)."""
    return trial.user_attrs.get(RUN_ID_ATTR) or study.user_attrs.get(
        f"{RUN_ID_ATTR}.{trial.number}"
    )


def is_infrastructure_failure(study: Any, trial: Any) -> bool:
    """Whether a study trial failed for an infrastructure reason (and was run again)."""
    return str(failure_of(study, trial) or "").startswith(INFRASTRUCTURE)


def sweep_done(study: Any, budget: int, replacements: int) -> bool:
    """Whether ``budget`` trials finished on their merits, or every allowed trial finished."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    infra = sum(is_infrastructure_failure(study, t) for t in finished)
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
            "mlflow_run_id": run_id_of(study, t),
            "failure": failure_of(study, t),
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
        logger.info("skipped %s: %s: %s", path.name, type(err).__name__, err)
        return None
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

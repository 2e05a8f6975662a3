"""The tune config at its boundary, the searcher's bookkeeping in a real Optuna SQLite study, and
the study's front and plots: no Ray cluster needed."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from mvtcae.config import ConfigError
from mvtcae.tune import load_tune_config, trial_config, trial_eval_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "configs" / "tune_demo.yaml"


def _write(tmp_path: Path, tune: dict, **extra) -> Path:
    path = tmp_path / "tune.yaml"
    body = {"base": str(REPO / "jobs" / "configs" / "demo.yaml"), "tune": tune, **extra}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", ["tune_demo", "tune_mfeat", "tune_mfeat_pareto"])
def test_shipped_tune_configs_validate(name):
    spec = load_tune_config(REPO / "jobs" / "configs" / f"{name}.yaml")
    assert {"model.alpha", "model.beta"} <= set(spec.tune.space)
    assert spec.tune.space["model.beta"].type == "loguniform"
    assert spec.tune.storage.startswith("sqlite:////")  # made absolute at the boundary
    assert Path(spec.experiment_dir).name == spec.study_name


def test_base_is_relative_to_the_tune_file_and_overrides_route_by_section():
    spec = load_tune_config(DEMO, ["tune.num_samples=3", "train.epochs=2"])
    assert spec.tune.num_samples == 3
    assert spec.experiment.train.epochs == 2
    assert spec.experiment.name == "mvtcae-demo"  # from demo.yaml, next to the tune file


@pytest.mark.parametrize("metric", ["val/loss", "train/loss", "val/recon_m0", "val/kld_m1"])
def test_loss_terms_are_refused_as_objectives(tmp_path, metric):
    path = _write(tmp_path, {"objectives": [{"metric": metric, "mode": "min"}]})
    with pytest.raises(ConfigError, match=r"tune\.objectives\.0\.metric.*α and β"):
        load_tune_config(path)


def test_unknown_objective_and_bad_distribution_name_their_field(tmp_path):
    with pytest.raises(ConfigError, match=r"tune\.objectives\.0\.metric.*unknown objective"):
        load_tune_config(_write(tmp_path, {"objectives": [{"metric": "val/accuracy"}]}))
    space = {"model.beta": {"type": "loguniform", "low": 0.0, "high": 10.0}}
    with pytest.raises(ConfigError, match=r"tune\.space\.model\.beta.*low > 0"):
        load_tune_config(_write(tmp_path, {"space": space}))


def test_space_edges_are_checked_against_the_experiment_config(tmp_path):
    space = {"model.alpha": {"type": "uniform", "low": 0.0, "high": 2.0}}
    with pytest.raises(ConfigError, match=r"model\.alpha.*less than or equal to 1"):
        load_tune_config(_write(tmp_path, {"space": space}))
    space = {"model.no_such_field": {"type": "uniform", "low": 0.0, "high": 1.0}}
    with pytest.raises(ConfigError, match="no_such_field"):
        load_tune_config(_write(tmp_path, {"space": space}))


def test_points_and_asha_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*model\.gamma"):
        load_tune_config(_write(tmp_path, {"points_to_evaluate": [{"model.gamma": 1}]}))
    tune = {"asha": {"grace_period": 40}}
    with pytest.raises(ConfigError, match=r"grace_period \(40\) exceeds train\.epochs \(30\)"):
        load_tune_config(_write(tmp_path, tune))


def test_trial_config_sets_sampled_values_and_validates():
    spec = load_tune_config(DEMO)
    cfg = trial_config(spec.experiment.to_dict(), {"model.alpha": 0.25, "train.optimizer.lr": 2e-3})
    assert cfg.model.alpha == 0.25 and cfg.train.optimizer.lr == 2e-3
    with pytest.raises(ConfigError, match="model.alpha"):
        trial_config(spec.experiment.to_dict(), {"model.alpha": 1.5})


def test_epoch_evaluation_computes_only_what_the_objectives_need():
    spec = load_tune_config(REPO / "jobs" / "configs" / "tune_mfeat_pareto.yaml")
    cfg = trial_eval_config(spec)
    assert cfg.joint_nll and cfg.coherence and not cfg.latent_accuracy and not cfg.plots
    assert cfg.max_samples == spec.tune.val_max_samples and cfg.nll_subsets_per_size == 0


def _searcher(tmp_path: Path, objectives: list[dict]):
    from mvtcae.tune_study import build_searcher, open_storage

    path = _write(tmp_path, {"objectives": objectives, "storage": f"sqlite:///{tmp_path}/o.db"})
    spec = load_tune_config(path)
    return spec, build_searcher(spec, open_storage(spec.tune.storage))


def test_searcher_records_errors_and_nan_as_failed(tmp_path):
    spec, searcher = _searcher(tmp_path, [{"metric": "val/joint_nll", "mode": "min"}])
    for trial_id in ("a", "b", "c", "d"):
        params = searcher.suggest(trial_id)
        assert 0.0 <= params["model.alpha"] <= 1.0 and 0.1 <= params["model.beta"] <= 10.0
    searcher.on_trial_complete("a", {"val/joint_nll": 12.5, "mlflow_run_id": "run-a"})
    searcher.on_trial_complete("b", {"val/joint_nll": math.nan})
    searcher.on_trial_complete("c", {"val/joint_nll": 9.0}, error=True)  # stale value, then raised
    searcher.on_trial_complete("d", None, error=True)
    study = optuna.load_study(study_name=spec.study_name, storage=spec.tune.storage)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    assert study.best_trial.user_attrs == {"tune_trial_id": "a", "mlflow_run_id": "run-a"}
    assert "not finite" in study.get_trials()[1].user_attrs["failure"]


def test_two_objectives_give_a_pareto_front_and_plots(tmp_path):
    from mvtcae.tune_study import best_row, pareto_front, save_study_plots

    objectives = [
        {"metric": "val/joint_nll", "mode": "min"},
        {"metric": "val/coherence_1", "mode": "max"},
    ]
    spec, searcher = _searcher(tmp_path, objectives)
    results = {"a": (10.0, 0.5), "b": (12.0, 0.8), "c": (11.0, 0.4), "d": (9.0, 0.3)}
    for trial_id, (nll, coherence) in results.items():
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val/joint_nll": nll, "val/coherence_1": coherence})
    study = optuna.load_study(study_name=spec.study_name, storage=spec.tune.storage)
    front = {tuple(row["values"]) for row in pareto_front(study)}
    assert front == {(10.0, 0.5), (12.0, 0.8), (9.0, 0.3)}  # c is dominated by a
    assert best_row(study, spec.tune.modes)["values"] == [9.0, 0.3]
    plots = save_study_plots(study, spec.tune.metrics, tmp_path / "plots")
    assert {"optimization_history", "contour_alpha_beta", "pareto_front"} <= set(plots)
    assert all(p.stat().st_size > 1000 for p in plots.values())

"""The tune config at its boundary: shipped files, overrides, search-space edges, objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mvtcae.config import ConfigError, load_sweep_config, trial_config, trial_eval_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "configs" / "tune_demo.yaml"


def _write(tmp_path: Path, tune: dict, **extra) -> Path:
    path = tmp_path / "tune.yaml"
    body = {"base": str(REPO / "jobs" / "configs" / "demo.yaml"), "tune": tune, **extra}
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", ["tune_demo", "tune_mfeat", "tune_mfeat_pareto"])
def test_shipped_tune_configs_validate(name):
    spec = load_sweep_config(REPO / "jobs" / "configs" / f"{name}.yaml")
    assert {"model.alpha", "model.beta"} <= set(spec.tune.space)
    assert spec.tune.space["model.beta"].type == "loguniform"
    assert spec.tune.storage.startswith("sqlite:////")  # made absolute at the boundary
    assert Path(spec.experiment_dir).name == spec.study_name


def test_base_is_relative_to_the_tune_file_and_overrides_route_by_section():
    spec = load_sweep_config(DEMO, ["tune.num_samples=3", "train.epochs=2"])
    assert spec.tune.num_samples == 3
    assert spec.experiment.train.epochs == 2
    assert spec.experiment.name == "mvtcae-demo"  # from demo.yaml, next to the tune file


@pytest.mark.parametrize("metric", ["val/loss", "train/loss", "val/recon_m0", "val/kld_m1"])
def test_loss_terms_are_refused_as_objectives(tmp_path, metric):
    path = _write(tmp_path, {"objectives": [{"metric": metric, "mode": "min"}]})
    with pytest.raises(ConfigError, match=r"tune\.objectives\.0\.metric.*α and β"):
        load_sweep_config(path)


def test_unknown_objective_and_bad_distribution_name_their_field(tmp_path):
    with pytest.raises(ConfigError, match=r"tune\.objectives\.0\.metric.*unknown objective"):
        load_sweep_config(_write(tmp_path, {"objectives": [{"metric": "val/accuracy"}]}))
    space = {"model.beta": {"type": "loguniform", "low": 0.0, "high": 10.0}}
    with pytest.raises(ConfigError, match=r"tune\.space\.model\.beta.*low > 0"):
        load_sweep_config(_write(tmp_path, {"space": space}))


def test_space_edges_are_checked_against_the_experiment_config(tmp_path):
    space = {"model.alpha": {"type": "uniform", "low": 0.0, "high": 2.0}}
    with pytest.raises(ConfigError, match=r"model\.alpha.*less than or equal to 1"):
        load_sweep_config(_write(tmp_path, {"space": space}))
    space = {"model.no_such_field": {"type": "uniform", "low": 0.0, "high": 1.0}}
    with pytest.raises(ConfigError, match="no_such_field"):
        load_sweep_config(_write(tmp_path, {"space": space}))


def test_points_and_asha_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*model\.gamma"):
        load_sweep_config(_write(tmp_path, {"points_to_evaluate": [{"model.gamma": 1}]}))
    tune = {"asha": {"grace_period": 40}}
    with pytest.raises(ConfigError, match=r"grace_period \(40\) exceeds train\.epochs \(30\)"):
        load_sweep_config(_write(tmp_path, tune))


def test_trial_config_sets_sampled_values_and_validates():
    spec = load_sweep_config(DEMO)
    cfg = trial_config(spec.experiment.to_dict(), {"model.alpha": 0.25, "train.optimizer.lr": 2e-3})
    assert cfg.model.alpha == 0.25 and cfg.train.optimizer.lr == 2e-3
    with pytest.raises(ConfigError, match="model.alpha"):
        trial_config(spec.experiment.to_dict(), {"model.alpha": 1.5})


def test_epoch_evaluation_computes_only_what_the_objectives_need():
    spec = load_sweep_config(REPO / "jobs" / "configs" / "tune_mfeat_pareto.yaml")
    cfg = trial_eval_config(spec)
    assert cfg.joint_nll and cfg.coherence and not cfg.latent_accuracy and not cfg.plots
    assert cfg.max_samples == spec.tune.val_max_samples and cfg.nll_subsets_per_size == 0


def test_single_worker_trials_train_in_process_unless_told_otherwise(tmp_path):
    from mvtcae.config.sweep import trials_in_process

    mfeat = REPO / "jobs" / "configs" / "tune_mfeat.yaml"
    assert trials_in_process(load_sweep_config(mfeat))  # one worker: automatic
    assert not trials_in_process(load_sweep_config(mfeat, ["tune.trials_in_process=false"]))
    assert not trials_in_process(load_sweep_config(mfeat, ["train.num_workers=2"]))
    searched = {"train.num_workers": {"type": "categorical", "choices": [1, 2]}}
    one = ["train.num_workers=1"]
    assert not trials_in_process(load_sweep_config(_write(tmp_path, {"space": searched}), one))
    with pytest.raises(ConfigError, match=r"trials_in_process: true needs train\.num_workers 1"):
        load_sweep_config(mfeat, ["tune.trials_in_process=true", "train.num_workers=2"])
    with pytest.raises(ConfigError, match=r"no train\.num_workers in tune\.space"):
        load_sweep_config(_write(tmp_path, {"space": searched, "trials_in_process": True}), one)


def test_elastic_trials_train_in_worker_groups_with_their_range():
    """``train.num_workers: [min, max]`` in a sweep: every trial's Train run is elastic with that
    range, so trials train in worker groups of their own, never in the trial's process."""
    from mvtcae.config.sweep import trial_config, trials_in_process
    from mvtcae.training import scaling_config

    mfeat = REPO / "jobs" / "configs" / "tune_mfeat.yaml"
    spec = load_sweep_config(mfeat, ["train.num_workers=[1, 2]", "train.use_gpu=false"])
    assert not trials_in_process(spec)
    trial = trial_config(spec.experiment.to_dict(), {"model.beta": 1.0})
    assert scaling_config(trial.train).num_workers == (1, 2)
    with pytest.raises(ConfigError, match=r"trials_in_process: true needs train\.num_workers 1"):
        load_sweep_config(mfeat, ["tune.trials_in_process=true", "train.num_workers=[1, 2]"])

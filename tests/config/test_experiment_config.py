"""The experiment config: shipped YAML files validate, overrides apply, bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvtcae.config import ConfigError, ExperimentConfig, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("name", ["demo", "polymnist", "mfeat"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert Path(cfg.train.storage_path).is_absolute()
    assert Path(cfg.data.resolved_dir()).is_absolute()


def test_full_polymnist_config_follows_the_original_settings() -> None:
    cfg = load_config(CONFIGS / "polymnist.yaml")
    assert cfg.model.alpha == pytest.approx(5 / 6)
    assert (cfg.model.beta, cfg.model.latent_dim, cfg.model.decoder_scale) == (2.5, 512, 0.75)
    assert (cfg.train.optimizer.lr, cfg.train.batch_size) == (1e-3, 256)


def test_embedded_defaults_are_the_demo() -> None:
    demo, defaults = load_config(CONFIGS / "demo.yaml"), load_config(None)
    assert demo.model == defaults.model
    assert demo.train.epochs == defaults.train.epochs
    assert demo.train.num_workers == defaults.train.num_workers == 2
    assert demo.data.dataset == defaults.data.dataset == "mfeat"


def test_overrides_parse_yaml_values_into_nested_sections() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=7",
            "train.optimizer.lr=0.01",
            "train.precision=bf16",
            "model.decoders_dist={m0: normal}",
        ],
    )
    assert cfg.train.epochs == 7
    assert cfg.train.optimizer.lr == 0.01
    assert cfg.train.precision == "bf16"
    assert cfg.model.decoders_dist == {"m0": "normal"}


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "demo.yaml", ["train.epochs=3"])
    cfg.to_yaml(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.epochs=0", "train.epochs"),
        ("train.precision=fp8", "train.precision"),
        ("model.alpha=1.5", "model.alpha"),
        ("model.decoders_dist={m0: gauss}", "model.decoders_dist"),
        ("model.decoder_scale=-1", "model.decoder_scale"),
        ("train.optimizer.name=lamb", "train.optimizer.name"),
        ("train.checkpoint.mode=best", "train.checkpoint.mode"),
        ("train.batch_sise=3", "train.batch_sise"),
        ("tracking.promotion_mode=up", "tracking.promotion_mode"),
    ],
)
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {field}: "):
        load_config(None, [override])


def test_batch_smaller_than_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.batch_size .* smaller than train.num_workers"):
        config_from_dict({"train": {"batch_size": 1, "num_workers": 2}})


def test_custom_dataset_needs_a_directory() -> None:
    with pytest.raises(ConfigError, match="data.dir is required"):
        config_from_dict({"data": {"dataset": "custom"}})


def test_holding_a_dataset_that_must_stream_is_refused() -> None:
    data = {"hold_in_workers": True, "materialize": False}
    with pytest.raises(ConfigError, match="hold_in_workers.*materialize"):
        config_from_dict({"data": data})
    assert config_from_dict({"data": data | {"hold_in_workers": None}}).data.hold_in_workers is None


def test_placement_strategy_reaches_the_scaling_config() -> None:
    from mvtcae.training import scaling_config

    cfg = load_config(None, ["train.use_gpu=false", "train.placement_strategy=STRICT_SPREAD"])
    assert scaling_config(cfg.train).placement_strategy == "STRICT_SPREAD"
    assert (
        scaling_config(load_config(None, ["train.use_gpu=false"]).train).placement_strategy
        == "PACK"
    )
    with pytest.raises(ConfigError, match="train.placement_strategy"):
        load_config(None, ["train.placement_strategy=EVERYWHERE"])


def test_an_elastic_worker_range_reaches_ray_and_is_checked() -> None:
    """``train.num_workers: [min, max]``: Ray's elastic ScalingConfig, the resize check, min
    for what must fit, max for the batch check, a round trip through YAML; a bad range names
    the field."""
    from mvtcae.training import scaling_config
    from mvtcae.training.preflight import requested_resources
    from mvtcae.training.run_console import describe_workers

    cfg = load_config(
        None, ["train.use_gpu=false", "train.num_workers=[1, 4]", "train.elastic_resize_check_s=5"]
    )
    scaling = scaling_config(cfg.train)
    assert scaling.num_workers == (1, 4) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers) == (1, 4)
    assert scaling.elastic_resize_monitor_interval_s == 5
    assert (cfg.train.min_workers, cfg.train.max_workers, cfg.train.elastic) == (1, 4, True)
    asked, what = requested_resources(cfg.train)
    assert asked == {"CPU": 1.0} and "train.num_workers min 1" in what["CPU"]
    assert describe_workers(cfg.train.num_workers, {"CPU": 1}) == "1-4 workers x (CPU 1)"
    assert describe_workers(2, {"CPU": 1}) == "2 workers x (CPU 1)"
    assert config_from_dict(cfg.to_dict()).train.num_workers == (1, 4)
    fixed = load_config(None, ["train.use_gpu=false"]).train
    assert not fixed.elastic and scaling_config(fixed).num_workers == 2
    for bad in ("[2, 1]", "[0, 2]", "0", "[1, 2, 3]"):
        with pytest.raises(ConfigError, match="train.num_workers"):
            load_config(None, [f"train.num_workers={bad}"])
    with pytest.raises(ConfigError, match=r"train.num_workers \(300 at most\)"):
        load_config(None, ["train.num_workers=[1, 300]"])


def test_the_final_evaluation_takes_the_cpus_training_freed() -> None:
    from mvtcae.training import evaluation_cpus

    demo = load_config(None, []).train  # 2 workers x 1 CPU
    assert evaluation_cpus(demo, largest_node=16) == 2
    half = load_config(None, ["train.resources_per_worker={CPU: 0.5}"]).train
    assert evaluation_cpus(half, largest_node=16) == 1
    big = load_config(None, ["train.num_workers=4", "train.resources_per_worker={CPU: 4}"])
    assert evaluation_cpus(big.train, largest_node=32) == 16
    assert evaluation_cpus(big.train, largest_node=8) == 8  # workers spread over nodes


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_to_dict_is_json_safe() -> None:
    import json

    assert json.loads(json.dumps(ExperimentConfig().to_dict()))["train"]["epochs"] >= 1


def test_cli_prints_the_validated_config_and_names_bad_fields() -> None:
    from click.testing import CliRunner

    from mvtcae.cli import main

    runner = CliRunner()
    ok = runner.invoke(
        main,
        [
            "train",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--set",
            "train.epochs=2",
            "--print-config",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert load_config(None, []).name == "mvtcae-demo"
    assert "epochs: 2" in ok.output
    bad = runner.invoke(main, ["train", "--set", "train.num_workers=0", "--print-config"])
    assert bad.exit_code == 2
    assert "train.num_workers" in bad.output


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("name=..", "name"),
        ("name=../elsewhere", "name"),
        ("name=/abs", "name"),
        ("train.run_name=a/b", "train.run_name"),
        ("train.run_name=..", "train.run_name"),
    ],
)
def test_run_names_that_could_leave_run_storage_are_refused(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*not allowed"):
        load_config(None, [override])


def test_a_study_name_that_could_leave_run_storage_is_refused(tmp_path: Path) -> None:
    from mvtcae.config import load_sweep_config

    with pytest.raises(ConfigError, match=r"tune\.study_name.*not allowed"):
        load_sweep_config(None, ["tune.study_name=../other"])


def test_cluster_variables_are_the_defaults_of_storage_and_dataset_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml"
    monkeypatch.delenv("MVTCAE_STORAGE_PATH", raising=False)
    monkeypatch.delenv("MVTCAE_DATA_DIR", raising=False)
    plain = load_config(shipped)
    assert plain.train.storage_path == str(Path("outputs/ray_results").resolve())
    assert plain.data.resolved_dir() == str(Path("data/mfeat").resolve())

    monkeypatch.setenv("MVTCAE_STORAGE_PATH", "s3://bucket/runs")
    monkeypatch.setenv("MVTCAE_DATA_DIR", str(tmp_path / "shared" / "mfeat"))
    for cfg in (load_config(shipped), load_config(None)):  # a shipped config, the defaults
        assert cfg.train.storage_path == "s3://bucket/runs"
        assert cfg.data.resolved_dir() == str(tmp_path / "shared" / "mfeat")
    # What a config or an override says still wins.
    cfg = load_config(shipped, [f"train.storage_path={tmp_path}/mine", "data.dir=elsewhere"])
    assert cfg.train.storage_path == str(tmp_path / "mine")
    assert cfg.data.resolved_dir() == str(Path("elsewhere").resolve())

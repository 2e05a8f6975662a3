"""`evaluate` end to end on a small real Parquet dataset with missing modalities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvtcae import MVTCAE, MVTCAEConfig
from mvtcae.config import EvaluationSection
from mvtcae.data import load_manifest, random_presence, write_arrays
from mvtcae.evaluation import coherence as coherence_module
from mvtcae.evaluation import evaluate
from mvtcae.evaluation.split import load_eval_split

N_CLASSES = 4


def _split(n: int, rng: np.random.Generator, missing: float) -> dict:
    labels = rng.integers(0, N_CLASSES, n)
    img = rng.integers(0, 60, (n, 1, 8, 8)).astype(np.uint8)
    for i, y in enumerate(labels):  # the label lights one quadrant
        r, c = divmod(int(y), 2)
        img[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 180
    vec = np.eye(N_CLASSES, 6, dtype=np.float32)[labels] + rng.normal(0, 0.2, (n, 6)).astype(
        np.float32
    )
    aux = np.eye(N_CLASSES, dtype=np.float32)[labels] * 2 + rng.normal(0, 0.5, (n, 4)).astype(
        np.float32
    )
    masks = random_presence(n, ["img", "vec", "aux"], missing, rng)
    return {"data": {"img": img, "vec": vec, "aux": aux}, "masks": masks, "labels": labels}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A three-modality dataset (uint8 image + two vectors), 20% missing, written as Parquet."""
    root = tmp_path_factory.mktemp("ds") / "quadrants"
    rng = np.random.default_rng(0)
    write_arrays(root, {"train": _split(300, rng, 0.2), "test": _split(100, rng, 0.2)})
    return root


@pytest.fixture(scope="module")
def trained(dataset):
    """A small MVTCAE trained for 60 full-batch steps on the dataset."""
    manifest = load_manifest(dataset)
    torch.manual_seed(0)
    model = MVTCAE(
        MVTCAEConfig(
            n_modalities=3,
            latent_dim=6,
            input_dims={m: s.shape for m, s in manifest.modalities.items()},
            decoders_dist={m: s.distribution for m, s in manifest.modalities.items()},
            alpha=5 / 6,
            beta=1.0,
        )
    )
    batch = load_eval_split(dataset, "train").batch(slice(None))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(60):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def small_config(tmp_path, **overrides) -> EvaluationSection:
    values = dict(
        max_samples=100,
        probe_train_samples=300,
        classifier_epochs=8,
        classifier_batch_size=64,
        classifier_lr=5e-3,
        classifier_cache_dir=tmp_path / "cache",
        nll_K=20,
        nll_batch_size_K=10,
        nll_max_samples=40,
        grid_samples=4,
    )
    return EvaluationSection(**{**values, **overrides})


def test_evaluate_reports_every_measure_and_writes_plots(dataset, trained, tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    report = evaluate(trained, dataset, cfg, out_dir=tmp_path / "out")

    expected = {f"eval/latent_acc_{k}" for k in (1, 2, 3)}
    expected |= {"eval/coherence_1", "eval/coherence_2", "eval/joint_nll"}
    expected |= {"eval/latent_acc_mean", "eval/coherence_mean"}
    expected |= {f"eval/joint_nll_{k}" for k in (1, 2, 3)}
    expected |= {f"eval/classifier_acc_{m}" for m in ("img", "vec", "aux")}
    assert set(report.metrics) == expected
    assert all(np.isfinite(v) for v in report.metrics.values())
    for m in ("img", "vec", "aux"):  # the data is easy: the platform's classifiers must learn it
        assert report.metrics[f"eval/classifier_acc_{m}"] > 0.9
    for k in (1, 2, 3):  # a trained model's latents carry the label far above chance (0.25)
        assert report.metrics[f"eval/latent_acc_{k}"] > 0.6
    assert 0.0 <= report.metrics["eval/coherence_1"] <= 1.0

    assert set(report.plots) == {"reconstruction", "cross_modal_img", "latent_projection", "trend"}
    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.plots["trend"] == tmp_path / "out" / "plots" / "trend.png"
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["metrics"] == pytest.approx(report.metrics)
    cost = saved["details"]["cost"]  # what the evaluation computed, stated up front
    assert cost["coherence decoder passes"] > 0 and cost["joint NLL decoder passes"] > 0
    assert set(saved["details"]["coherence_by_subset"]) == {
        "img",
        "vec",
        "aux",
        "img+vec",
        "img+aux",
        "vec+aux",
    }

    # A second evaluation reads the cached classifiers: training them again would fail here.
    def no_training(*args, **kwargs):
        raise AssertionError("classifier retrained despite the cache")

    monkeypatch.setattr(coherence_module, "train_classifier", no_training)
    again = evaluate(trained, dataset, cfg.model_copy(update={"plots": False, "joint_nll": False}))
    for m in ("img", "vec", "aux"):
        key = f"eval/classifier_acc_{m}"
        assert again.metrics[key] == report.metrics[key]
    assert again.metrics["eval/coherence_2"] == report.metrics["eval/coherence_2"]


def test_joint_nll_is_the_models_estimate_per_sample(dataset, trained, tmp_path):
    cfg = small_config(
        tmp_path,
        latent_accuracy=False,
        coherence=False,
        plots=False,
        nll_subsets_per_size=0,
        nll_max_samples=30,
        batch_size=4 * 30,  # one row batch, so that the random draws line up
        seed=3,
    )
    report = evaluate(trained, dataset, cfg)
    assert set(report.metrics) == {"eval/joint_nll"}
    batch = load_eval_split(dataset, "test", cfg.max_samples, cfg.seed).batch(np.arange(30))
    torch.manual_seed(3)
    expected = (
        float(trained.compute_joint_nll(batch, K=cfg.nll_K, batch_size_K=cfg.nll_batch_size_K)) / 30
    )
    assert report.metrics["eval/joint_nll"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_refuses_a_dataset_without_the_models_modalities(dataset, tmp_path):
    other = MVTCAE(MVTCAEConfig(n_modalities=1, latent_dim=2, input_dims={"audio": (3,)}))
    with pytest.raises(ValueError, match="lacks the model's modalities"):
        evaluate(other, dataset, small_config(tmp_path))


def _cli_overrides(tmp_path) -> list[str]:
    values = {
        "eval.latent_accuracy": "false",
        "eval.coherence": "false",
        "eval.nll_K": "10",
        "eval.nll_max_samples": "20",
        "eval.nll_subsets_per_size": "0",
        "eval.grid_samples": "3",
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.registered_model_name": "cli-model",
    }
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def test_cli_evaluates_a_model_directory(dataset, trained, tmp_path):
    from click.testing import CliRunner

    from mvtcae.cli import main

    trained.save(str(tmp_path / "model"))
    out = tmp_path / "eval"
    args = ["evaluate", str(tmp_path / "model"), "--data", str(dataset), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", *_cli_overrides(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "eval/joint_nll" in result.output
    saved = json.loads((out / "evaluation.json").read_text())
    assert set(saved["metrics"]) == {"eval/joint_nll"}
    assert (out / "plots" / "reconstruction.png").is_file()


def test_cli_evaluates_the_registered_champion_into_a_run(dataset, trained, tmp_path):
    import mlflow
    from click.testing import CliRunner

    from mvtcae.cli import main
    from mvtcae.config import TrackingSection
    from mvtcae.tracking import client_for, log_model_and_register, start_run

    tracking = TrackingSection(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="cli-model"
    )
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        with start_run(tracking) as run:
            log_model_and_register(trained, tracking, {"eval/joint_nll": 1.0})
        args = ["evaluate", "models:/cli-model@champion", "--data", str(dataset)]
        args += ["--out", str(tmp_path / "eval"), "--log-run", run.info.run_id]
        result = CliRunner().invoke(main, [*args, *_cli_overrides(tmp_path)])
        assert result.exit_code == 0, result.output
        client = client_for(tracking)
        logged = client.get_run(run.info.run_id).data.metrics
        saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
        assert logged["eval/joint_nll"] == pytest.approx(saved["metrics"]["eval/joint_nll"])
        names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert names == {"evaluation/evaluation.json", "evaluation/plots"}
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/plots")}
        assert "evaluation/plots/latent_pca.png" in plots
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def test_cli_refuses_a_missing_model(dataset, tmp_path):
    from click.testing import CliRunner

    from mvtcae.cli import main

    args = ["evaluate", str(tmp_path / "nothing"), "--data", str(dataset), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1  # a user error: one line, no traceback
    assert "mvtcae: error: " in result.output and "no model_config.json" in result.output
    assert "Traceback" not in result.output


def test_trend_plot_marks_chance_and_needs_a_measure(tmp_path):
    from matplotlib.image import imread

    from mvtcae.evaluation.plots import save_trend_plot

    metrics = {
        "eval/coherence_1": 0.4,
        "eval/coherence_2": 0.6,
        "eval/latent_acc_1": 0.7,
        "eval/latent_acc_2": 0.8,
        "eval/latent_acc_3": 0.85,
        "eval/joint_nll": 12.0,
        "eval/coherence_mean": 0.5,
    }
    path = save_trend_plot(metrics, 4, tmp_path / "trend.png")
    assert path is not None and imread(path).shape[2] in (3, 4)
    assert save_trend_plot({"eval/joint_nll": 1.0}, 4, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_evaluation_cost_counts_the_work_of_each_measure():
    from mvtcae.config import EvaluationSection
    from mvtcae.evaluation import evaluation_cost

    cfg = EvaluationSection(
        max_subsets_per_size=None,
        probe_train_samples=100,
        nll_K=10,
        nll_max_samples=20,
        nll_subsets_per_size=1,
    )
    cost = evaluation_cost(cfg, modalities=3, rows=50)
    # coherence: k=1 -> 3 subsets x 2 targets, k=2 -> 3 subsets x 1 target, per row
    assert cost["coherence decoder passes"] == 50 * (3 * 2 + 3 * 1)
    assert cost["probe encoder passes"] == 150 * (3 * 1 + 3 * 2 + 1 * 3)
    assert cost["joint NLL decoder passes"] == 20 * 10 * 3
    assert cost["subset NLL decoder passes"] == 20 * 10 * 3 * 3
    off = EvaluationSection(coherence=False, latent_accuracy=False, nll_subsets_per_size=0)
    assert set(evaluation_cost(off, 3, 50)) == {"joint NLL decoder passes"}


def test_evaluate_checkpoint_in_process_leaves_the_callers_thread_count(dataset, trained, tmp_path):
    from mvtcae.evaluation import evaluate_checkpoint
    from mvtcae.storage.checkpoints import write_checksums

    checkpoint = tmp_path / "checkpoint_epoch_0001"
    trained.save(str(checkpoint))
    write_checksums(checkpoint)
    cfg = small_config(tmp_path, latent_accuracy=False, coherence=False, plots=False)
    before = torch.get_num_threads()
    target = 1 if before > 1 else 2
    try:
        done = evaluate_checkpoint([str(checkpoint)], str(dataset), cfg, threads=target)
        # A driver or trial that evaluates in its own process goes on with its own threads.
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    assert done.checkpoint == str(checkpoint) and done.skipped == [] and done.out_dir is None
    assert done.report.metrics["eval/joint_nll"] == pytest.approx(
        evaluate(trained, dataset, cfg).metrics["eval/joint_nll"]
    )


def test_latent_probe_from_experts_encoded_once_matches_encoding_each_subset(dataset, trained):
    """The probe encodes each modality once and multiplies experts per subset; an independent
    computation encodes every subset's rows with `MVTCAE.encode`, as a user would."""
    from mvtcae.evaluation.probe import (
        expert_table,
        latent_accuracy,
        linear_probe_accuracy,
        subset_means,
    )
    from mvtcae.evaluation.split import subsets_of_size

    cfg = EvaluationSection(max_samples=100, probe_train_samples=300, batch_size=32)
    train = load_eval_split(dataset, "train", cfg.probe_train_samples, cfg.seed)
    test = load_eval_split(dataset, "test", cfg.max_samples, cfg.seed)
    mods = trained.modalities

    def encoded(split, subset, rows):
        with torch.no_grad():
            z = trained.encode(split.batch(rows, subset), cond_mod=list(subset), return_mean=True).z
        return z.numpy()

    table = expert_table(trained, test, cfg.batch_size, "cpu")
    expected = {}
    for k in range(1, len(mods) + 1):
        for subset in subsets_of_size(mods, k, None, np.random.default_rng(0)):
            rows = test.rows_with(subset)
            np.testing.assert_allclose(
                subset_means(table, mods, subset, rows),
                encoded(test, subset, rows),
                rtol=1e-5,
                atol=1e-6,
            )
            train_rows = train.rows_with(subset)
            expected["+".join(subset)] = linear_probe_accuracy(
                encoded(train, subset, train_rows),
                train.labels[train_rows],
                encoded(test, subset, rows),
                test.labels[rows],
                cfg.probe_max_iter,
                cfg.seed,
            )
    _, details = latent_accuracy(trained, train, test, cfg, "cpu")
    assert details == pytest.approx(expected)

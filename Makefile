# FaceAge: set-up, tests, pipeline. Every target works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup help test test-unit repro quick quick-finetune quick-resnet sweep bento serve bench loadtest base-image container mlflow-server clean

# Creates .venv and installs the project with its test tools (idempotent). The bento's lock constrains
# the packages it holds, so the tests run against the versions the image installs.
setup: $(VENV)/.installed
# A .venv without pip (its creation stopped before ensurepip: Ctrl-C, or Debian without python3-venv)
# is made again: `python3 -m venv` over it adds pip (a bare `test -x` left make setup failing for good).
$(VENV)/.installed: pyproject.toml bento-requirements.txt
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' -c bento-requirements.txt
	touch $@

# One line per target (no prerequisite: prints, installs nothing). `make` alone is `make setup`.
help:
	@printf '%s\n' 'Targets (README: Quick start):' \
	  'setup           .venv with the project and its test tools, against bento-requirements.txt (idempotent)' \
	  'help            this list' \
	  'test            all tests: unit + integration (those needing ../shared skip without it)' \
	  'test-unit       the tests not marked integration' \
	  'repro           dvc repro: the pipeline with params.yaml (APPA-REAL, ResNet-18)' \
	  'quick           the CPU profile on ../shared/datasets/appa-real-sample (train.backbone=dlib_age); SAMPLE=path' \
	  'quick-finetune  dlib age network fine-tuned without forgetting, on the sample' \
	  'quick-resnet    ResNet-18 from scratch, 5 epochs at 112 px, on the sample' \
	  'sweep           one DVC experiment per backbone on the sample, then reports/backbones.md' \
	  'bento           champion MLflow run -> registry -> BentoML model face_age -> bento face_age' \
	  'serve           bentoml serve face_age:latest on SERVE_HOST:SERVE_PORT (127.0.0.1:3000; UI at /ui)' \
	  'bench           service latency, throughput and size (needs make bento)' \
	  'loadtest        2,000 POST /predict at 16 concurrent, 10% malformed (needs make bento)' \
	  'base-image      the local Debian + Python base image bentofile.yaml names (debootstrap, root)' \
	  'container       Docker image IMAGE (face-age:latest) of face_age:latest' \
	  'mlflow-server   a shared MLflow tracking server on MLFLOW_HOST:MLFLOW_PORT (127.0.0.1:5000)' \
	  'clean           removes .pytest_cache'

# All tests: unit + integration (integration tests that need ../shared skip without it).
test: setup
	$(BIN)/python -m pytest

# The quick loop while working.
test-unit: setup
	$(BIN)/python -m pytest -m 'not integration'

repro: setup
	$(BIN)/dvc repro

# The quick CPU profile (main job): the whole pipeline on the 2,100-face shared sample with the
# best offline recipe measured (reports/recipe_dlib_age.md, round 7): dlib's pretrained age and
# face-recognition networks, frozen, with an ensemble of five MLP heads over the age network's
# features and age distribution and the face descriptor (train.head=auto = fused), trained 30 epochs
# on the cached features. A DVC experiment tracked in MLflow.
# Each profile runs on top of the committed params.yaml (faceage.experiment): `dvc exp run -S` leaves
# its overrides in the workspace, and the next profile would otherwise inherit them.
SAMPLE ?= $(abspath ../shared/datasets/appa-real-sample)
EXP := $(BIN)/python -m faceage.experiment
QUICK := -S "fetch_data.source=$(SAMPLE)" -S train.backbone=dlib_age
quick: setup
	$(EXP) $(QUICK)
	$(BIN)/dvc metrics show

# The former dlib_age recipe: dlib's own head, its last two stages fine-tuned 12 epochs with
# layer-wise lr and learning without forgetting, then the WiSE-FT weight mix chosen on validation.
QUICK_FINETUNE := $(QUICK) -S train.epochs=12 -S train.lr=0.003 -S train.layer_lr_decay=0.316 \
	-S train.freeze_blocks=4 -S train.distill_weight=1.0 -S train.wise_ft=true
quick-finetune: setup
	$(EXP) $(QUICK_FINETUNE)
	$(BIN)/dvc metrics show

# The former quick profile: ResNet-18 from scratch, 5 epochs at 112 px (7 min 27 s whole on 2 cores in round 5, 2 min 40 s with preprocess cached; test MAE ~13).
# No lower-resolution training faces: in 5 epochs from scratch they only slow convergence (13.94 vs 13.13).
QUICK_RESNET := -S "fetch_data.source=$(SAMPLE)" -S train.pretrained=none -S train.epochs=5 -S train.image_size=112 \
	-S train.low_res=0.0
quick-resnet: setup
	$(EXP) $(QUICK_RESNET)
	$(BIN)/dvc metrics show

# Backbone sweep (CPU profile) on the sample, one DVC experiment per backbone, then
# reports/backbones.md + .png from MLflow. On a GPU box with APPA-REAL: python -m faceage.sweep --profile gpu
# --source takes the path itself: SAMPLE quoted for the shell (a space in it, or in the repo's path), and
# the Hydra quotes `make quick` needs (SAMPLE="'/a,b/sample'") taken off, and the \' escapes inside them (the sweep quotes it itself).
sweep: setup
	s='$(subst ','\'',$(SAMPLE))'; case "$$s" in "'"*"'"|'"'*'"') s="$${s#?}"; s="$${s%?}"; \
	  s="$$(printf '%s' "$$s" | sed -e "s/\\\\'/'/g" -e 's/\\"/"/g')";; esac; \
	$(BIN)/python -m faceage.sweep --profile cpu --source "$$s"

# --- service (bento) ---
# Champion run -> MLflow registry face-age@champion -> BentoML model face_age -> bento face_age.
bento serve bench loadtest: export BENTOML_DO_NOT_TRACK := True
bento: setup
	$(BIN)/python stages/package.py
	$(BIN)/bentoml build

# http://127.0.0.1:3000/predict, /annotate, /predict_batch; UI at http://127.0.0.1:3000/ui
# Local by default, as mlflow-server: SERVE_HOST=0.0.0.0 serves other machines (BentoML's own default);
# SERVE_PORT=3001 when 3000 is taken.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 3000
serve: setup
	$(BIN)/bentoml serve face_age:latest --host $(SERVE_HOST) --port $(SERVE_PORT)

# Cold start, /predict latency and throughput (1 and 8 clients) vs the in-process predictor, bento
# size; needs `make bento`. Two bentos side by side: python benchmarks/bench_service.py --tag A --tag B
bench: setup
	$(BIN)/python benchmarks/bench_service.py

# 2,000 POST /predict at 16 concurrent, 10% malformed: 0 5xx, 0 dropped, 4xx for each malformed one,
# /readyz afterwards, server RSS growth < 10%; needs `make bento`.
loadtest: setup
	$(BIN)/python benchmarks/load_test.py

# --- container ---
# Docker image of face_age:latest, with no Docker Hub: bentofile.yaml's docker.base_image is a
# local Debian + Python image that scripts/base-image.sh builds with debootstrap (root) when it
# is missing. DOCKER_BUILDKIT=0 (the classic builder) where the docker CLI has no buildx plugin.
IMAGE ?= face-age:latest
base-image:
	scripts/base-image.sh
container: export BENTOML_DO_NOT_TRACK := True
container: setup base-image
	DOCKER_BUILDKIT=$${DOCKER_BUILDKIT:-$$(docker buildx version >/dev/null 2>&1 && echo 1 || echo 0)} \
	  $(BIN)/bentoml containerize face_age:latest -t $(IMAGE)
	docker image inspect -f '$(IMAGE): {{.Size}} bytes' $(IMAGE)

# One MLflow tracking server for a team: runs and the model registry in a SQL database,
# artifacts stored under MLFLOW_ARTIFACTS and proxied through the server (clients upload and
# download over HTTP, no shared filesystem). Clients: export MLFLOW_TRACKING_URI=http://HOST:PORT
# For a team: MLFLOW_BACKEND=postgresql://user:pass@db/mlflow MLFLOW_HOST=0.0.0.0 (README).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
# Host headers the server answers besides localhost and private IPs, with the port: mlflow-host:5000
# (--allowed-hosts replaces MLflow's defaults, so they are appended: localhost and IPs keep working)
MLFLOW_ALLOWED_HOSTS ?=
COMMA := ,
MLFLOW_DEFAULT_HOSTS = $$($(BIN)/python -c 'from mlflow.server.security_utils import get_default_allowed_hosts as d; print(",".join(d()))')
mlflow-server: setup
	$(BIN)/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 2 \
		--backend-store-uri "$(MLFLOW_BACKEND)" --serve-artifacts --artifacts-destination "$(MLFLOW_ARTIFACTS)" \
		$(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts "$(MLFLOW_ALLOWED_HOSTS)$(COMMA)$(MLFLOW_DEFAULT_HOSTS)")

clean:
	rm -rf .pytest_cache

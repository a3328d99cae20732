# FaceAge: set-up, tests, pipeline. Every target works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup test test-unit repro quick quick-resnet sweep bento serve bench clean

# Creates .venv and installs the project with its test tools (idempotent).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# All tests: unit + integration (integration tests that need ../shared skip without it).
test: setup
	$(BIN)/python -m pytest

# The quick loop while working.
test-unit: setup
	$(BIN)/python -m pytest -m 'not integration'

repro: setup
	$(BIN)/dvc repro

# The quick CPU profile (main job): the whole pipeline on the 2,100-face shared sample with the
# best offline recipe measured (reports/recipe_dlib_age.md): dlib's pretrained age network, its first
# four stages frozen, the rest fine-tuned 12 epochs with layer-wise lr (head 3e-3, block5 ~1e-3,
# block4 3e-4) and learning without forgetting, then the WiSE-FT weight mix chosen on validation.
# A DVC experiment tracked in MLflow.
SAMPLE ?= $(abspath ../shared/datasets/appa-real-sample)
QUICK := -S fetch_data.source=$(SAMPLE) -S train.backbone=dlib_age -S train.epochs=12 -S train.lr=0.003 \
	-S train.layer_lr_decay=0.316 -S train.freeze_blocks=4 -S train.distill_weight=1.0 -S train.wise_ft=true
quick: setup
	$(BIN)/dvc exp run $(QUICK)
	$(BIN)/dvc metrics show

# The former quick profile: ResNet-18 from scratch, 5 epochs at 112 px (about 8 min on 2 cores, test MAE ~13).
QUICK_RESNET := -S fetch_data.source=$(SAMPLE) -S train.pretrained=none -S train.epochs=5 -S train.image_size=112
quick-resnet: setup
	$(BIN)/dvc exp run $(QUICK_RESNET)
	$(BIN)/dvc metrics show

# Backbone sweep (CPU profile) on the sample, one DVC experiment per backbone, then
# reports/backbones.md + .png from MLflow. On a GPU box with APPA-REAL: python -m faceage.sweep --profile gpu
sweep: setup
	$(BIN)/python -m faceage.sweep --profile cpu --source $(SAMPLE)

# --- service (bento) ---
# Champion run -> MLflow registry face-age@champion -> BentoML model face_age -> bento face_age.
bento serve bench: export BENTOML_DO_NOT_TRACK := True
bento: setup
	$(BIN)/python stages/package.py
	$(BIN)/bentoml build

# http://127.0.0.1:3000/predict, /annotate, /predict_batch; UI at http://127.0.0.1:3000/ui
serve: setup
	$(BIN)/bentoml serve face_age:latest

# /predict latency and throughput (1 and 8 clients) vs the in-process predictor; needs `make bento`.
bench: setup
	$(BIN)/python benchmarks/bench_service.py

clean:
	rm -rf .pytest_cache

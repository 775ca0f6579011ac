# lomar_fast: the user's verbs. `make setup` once, then `make test`, `make pretrain`, `make bench`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
# the JIT-built torch extensions (DeepSpeed's CPU comm op) live with the venv: the shared ~/.cache location is keyed
# by nothing but the Python and CUDA versions, so two checkouts rebuilt each other's op, one while the other loaded it
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
PIP       := $(VENV)/bin/pip
PYTHON    ?= python3
APT_PKGS  := pkg-config libopencv-dev libturbojpeg0-dev
STAMP     := $(VENV)/.setup-stamp

# demo / real-job knobs (override on the command line)
DATA_DIR     ?= data
IMAGENET_DIR ?=
DATA         ?= $(DATA_DIR)/demo/train.beton
MODEL        ?= lomar_vit_tiny_patch16
DS_CONFIG    ?= ds_configs/cpu.json
OUTPUT       ?= output/demo
NPROC        ?= 1
PRETRAIN_ARGS ?=
DEMO_DATA    := $(DATA_DIR)/demo/train.beton
# the demo: a tiny ViT, small windows, a short schedule that fits a few minutes on 2 CPU cores
DEMO_ARGS    ?= --input_size 160 --window_size 5 --num_window 3 --batch_size 32 --epochs 8 \
                --warmup_epochs 1 --blr 2e-3 --num_workers 2 --log_every 4 --save_every 4
DS_ACCEL     ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
PYTEST_ARGS  ?=
# the suite's parallel workers (pytest-xdist): one per core, at most 8; TEST_JOBS=0 runs it in this process
TEST_JOBS    ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 8 ? n : 8 )))
PYTEST_XDIST := -n $(TEST_JOBS) --dist loadgroup
PYTHON312    ?=
VIS_IMAGE    ?=
# make bench: the quick GPU run, or the tiny-model smoke run of the same code on a CPU
BENCH_ARGS   ?= $(if $(filter cpu,$(DS_ACCEL)),--tiny,--quick)
FT_MODEL     ?= vit_tiny_patch16
FT_INIT      ?= $(OUTPUT)/model.pth
FT_OUTPUT    ?= output/demo_ft
VAL          ?= $(DATA_DIR)/demo/val.beton
FINETUNE_ARGS ?=
FT_DEMO_ARGS ?= --input_size 160 --batch_size 32 --epochs 5 --warmup_epochs 1 --blr 4e-3 --num_workers 2 --log_every 4
KNN_DEMO_ARGS ?= --input_size 160 --num_workers 2

.PHONY: help setup apt-deps test test-fast pretrain finetune demo-data prep-imagenet bench gpu-kit wheelhouse clean

help:
	@echo "make setup          create .venv with torch, deepspeed, ffcv, timm (idempotent)"
	@echo "make test           setup, then the whole pytest suite"
	@echo "make test-fast      the suite without training runs, several ranks or compiles (tests marked slow)"
	@echo "make demo-data      build the built-in demo dataset under $(DATA_DIR)/demo"
	@echo "make pretrain       short LoMaR pretraining of a tiny ViT on the demo data"
	@echo "make finetune       fine-tune output/demo/model.pth on the demo classes, --eval it, k-NN of the encoder"
	@echo "make prep-imagenet IMAGENET_DIR=/path/to/imagenet DATA_DIR=/path/to/out"
	@echo "make bench          throughput benchmarks (LoMaR vs MAE)"
	@echo "make gpu-kit        every wheel an offline Python 3.12 GPU host needs, in .whl/ (alias: wheelhouse)"

apt-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing apt packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null || \
	      { echo "apt-get install$$missing failed"; exit 1; }; \
	  else \
	    echo "FFCV needs the apt packages:$$missing"; \
	    echo "run as root: apt-get install -y$$missing   (then rerun make setup)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml | apt-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null || \
	  { $(PIP) install -q --upgrade pip wheel setuptools && $(PIP) install -q torch==2.14.1 torchvision==0.29.1; }
	$(PIP) install -q -e '.[test]'
	@# DeepSpeed JIT-builds its CPU communication op on the first CPU start (about a minute): build it now, once
	@DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >$(VENV)/shm_op_build.log 2>&1 || \
	  { tail -5 $(VENV)/shm_op_build.log; echo "note: DeepSpeed's CPU comm op did not build now (log: $(VENV)/shm_op_build.log); the first CPU DeepSpeed start will build it"; }
	@touch $(STAMP)

setup: apt-deps $(STAMP)
	@echo "setup ok: $(VENV)"

test: setup
	$(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

demo-data: setup
	$(PY) -m data_prep.make_demo --out $(DATA_DIR)/demo

prep-imagenet: setup
	@if [ -z "$(IMAGENET_DIR)" ]; then \
	  echo "prep-imagenet needs IMAGENET_DIR=/path/to/imagenet (with train/ and val/ class folders)"; \
	  echo "  e.g. make prep-imagenet IMAGENET_DIR=/datasets/imagenet DATA_DIR=/fast/ffcv"; exit 2; fi
	$(PY) -m data_prep.write_beton --src $(IMAGENET_DIR) --out $(DATA_DIR) --splits train val

pretrain: setup
	@if [ "$(DATA)" = "$(DATA_DIR)/demo/train.beton" ] && [ ! -f "$(DATA)" ]; then \
	  $(PY) -m data_prep.make_demo --out $(DATA_DIR)/demo; fi
	@test -f "$(DATA)" || { echo "DATA=$(DATA) does not exist; build it with make prep-imagenet"; exit 2; }
	DS_ACCELERATOR=$(DS_ACCEL) $(VENV)/bin/deepspeed --num_gpus $(NPROC) lomar_fast/pretrain.py \
	  --deepspeed_config $(DS_CONFIG) --data_path $(DATA) --model $(MODEL) --output_dir $(OUTPUT) \
	  $(if $(filter $(DEMO_DATA),$(DATA)),$(DEMO_ARGS)) --resume auto $(PRETRAIN_ARGS)
	$(PY) -m lomar_fast.export --checkpoint $(OUTPUT) --out $(OUTPUT)/model.pth
	@img="$(VIS_IMAGE)"; [ -n "$$img" ] || img="$$(find $(DATA_DIR)/demo/imagefolder/val -name '*.jpg' 2>/dev/null | sort | head -1)"; \
	  if [ -n "$$img" ]; then $(PY) -m lomar_fast.visualize --checkpoint $(OUTPUT)/model.pth --out $(OUTPUT)/recon.png --image "$$img"; \
	  else echo "no image for the reconstruction PNG: pass VIS_IMAGE=some.jpg"; fi
	@echo "checkpoints: $(OUTPUT)   weights: $(OUTPUT)/model.pth   reconstruction: $(OUTPUT)/recon.png"
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(OUTPUT)/tensorboard"

finetune: setup
	@test -f "$(FT_INIT)" || { echo "FT_INIT=$(FT_INIT) does not exist: run make pretrain first (or pass FT_INIT=model.pth)"; exit 2; }
	@test -f "$(VAL)" || { echo "VAL=$(VAL) does not exist: build it with make demo-data or make prep-imagenet"; exit 2; }
	DS_ACCELERATOR=$(DS_ACCEL) $(VENV)/bin/deepspeed --num_gpus $(NPROC) lomar_fast/finetune.py \
	  --deepspeed_config $(DS_CONFIG) --finetune $(FT_INIT) --data_path $(DATA) --val_path $(VAL) \
	  --model $(FT_MODEL) --output_dir $(FT_OUTPUT) \
	  $(if $(filter $(DEMO_DATA),$(DATA)),$(FT_DEMO_ARGS)) --resume auto $(FINETUNE_ARGS)
	DS_ACCELERATOR=$(DS_ACCEL) $(PY) -m lomar_fast.finetune --eval --finetune $(FT_OUTPUT)/checkpoint-best.pth \
	  --val_path $(VAL) --deepspeed_config $(DS_CONFIG) $(if $(filter $(DEMO_DATA),$(DATA)),--num_workers 2)
	$(PY) -m lomar_fast.knn --checkpoint $(FT_INIT) --train $(DATA) --val $(VAL) \
	  $(if $(filter $(DEMO_DATA),$(DATA)),$(KNN_DEMO_ARGS))

bench: setup
	DS_ACCELERATOR=$(DS_ACCEL) $(PY) -m benchmarks.throughput $(BENCH_ARGS)

# the offline GPU kit (.whl/): deepspeed, ffcv for CPython 3.12 with its OpenCV/libjpeg-turbo libraries inside,
# and their pure-Python needs; benchmarks/gpu_kit_install.sh installs it on the host (see benchmarks/gpu_kit.py)
gpu-kit: setup
	$(PY) -m benchmarks.gpu_kit build --out .whl $(if $(PYTHON312),--python312 $(PYTHON312))
	$(PY) -m benchmarks.gpu_kit verify --kit .whl

wheelhouse: gpu-kit

clean:
	rm -rf build *.egg-info .pytest_cache

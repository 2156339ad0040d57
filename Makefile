# The two commands of the README: `make demo` (set up, train --tiny, caption at 8 tokens/step) and `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/.installed

demo: setup
	$(PY) train_stage1.py --tiny --objective mask --out out/base.safetensors
	$(PY) train_stage1.py --tiny --objective revision --init-from out/base.safetensors --out out/stage1.safetensors
	$(PY) sample.py --ckpt out/stage1.safetensors --scene-seed 0 --tokens-per-step 8 --trace

test: setup
	$(PY) -m pytest -q tests

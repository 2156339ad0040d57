# The two commands of the README: `make demo` (set up, train --tiny, caption a scene at 8 tokens/step) and `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/.installed

demo: setup
	$(PY) train_stage1.py --tiny --out out/tiny.safetensors
	$(PY) sample.py --ckpt out/tiny.safetensors --scene-seed 0 --tokens-per-step 8 --trace --trace-out out/trace.html
	$(PY) sample.py --ckpt out/tiny.safetensors --scene-seed 0 --tokens-per-step 8 --no-refine

test: setup
	$(PY) -m pytest -q tests

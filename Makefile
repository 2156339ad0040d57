# The two commands of the README: `make demo` (set up, train the --tiny base and Stage I, caption a scene at 8 tokens/step)
# and `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/.installed

# The base model (Eq. 1's masks, --tiny) learns to caption; Stage I (Eq. 2-3) then teaches it to revise.
demo: setup
	$(PY) train_stage1.py --tiny --objective mask --out out/base.safetensors
	$(PY) train_stage1.py --tiny --init-from out/base.safetensors --steps 600 --lr 1e-3 --warmup 20 --n-scenes 3000 \
		--out out/stage1.safetensors
	$(PY) sample.py --ckpt out/stage1.safetensors --scene-seed 0 --tokens-per-step 8 --trace --trace-out out/trace.html
	$(PY) sample.py --ckpt out/stage1.safetensors --scene-seed 0 --tokens-per-step 8 --no-refine

test: setup
	$(PY) -m pytest -q tests

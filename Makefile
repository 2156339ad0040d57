# The README's two commands: `make demo` (set up, train the --tiny base and Stage I, caption
# held-out scenes at 8 tokens per step) and `make test`.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/.installed

# The design card's two commands: the base (Eq. 1's masks) and Stage I (Eq. 2-3) from it, then a
# held-out scene at 8 tokens per step with the refining and the frozen sampler.
demo: setup
	$(PY) train_stage1.py --tiny
	$(PY) sample.py --tokens-per-step 8

test: setup
	$(PY) -m pytest -q tests

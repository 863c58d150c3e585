# concilium — the README's commands. Everything runs from a local .venv on CPU.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
PACK := demo_pack/manifest.json
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_SERVE_ENABLE_ACCESS_LOG := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install serve test check bench bench-quick eval pack clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,dev]'
	touch $(STAMP)

install: $(STAMP)

$(PACK): | $(STAMP)
	$(BIN)/concilium pack build --out demo_pack

pack: $(PACK)

serve: install pack
	$(BIN)/concilium serve --pack demo_pack --embed-pack embed_pack

test: install
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

BENCHES := routing_quality multi_adapter_serving gateway_overhead moe_lora moe_ffn \
	moe_generation token_routing_quality retrieval_routing logit_fusion

bench: install pack
	for b in $(BENCHES); do $(BIN)/python benchmarks/$$b.py || exit 1; done

bench-quick: install pack
	for b in $(BENCHES); do $(BIN)/python benchmarks/$$b.py --quick || exit 1; done

eval: install pack
	$(BIN)/concilium eval

clean:
	rm -rf $(VENV) .concilium .pytest_cache .mypy_cache .ruff_cache

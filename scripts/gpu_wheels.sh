# Sourced by scripts/rq1_gpu.sh and scripts/wiki_gpu.sh when they pack on this machine: `gpu_wheels PY DIR`
# downloads into DIR the wheels the lent GPU machine's image (Python 3.12) lacks: gguf (the SmolLM2 GGUF checkpoint)
# and orjson (lsr_core.utils parses JSON lines with it).
gpu_wheels() {
  "$1" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$2" gguf==0.19.0
  "$1" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d "$2" orjson==3.13.0
}

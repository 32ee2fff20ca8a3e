# The two commands of the README. Both create .venv if it is missing and install sliver into it.
SYSTEM_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sliver-installed

.PHONY: setup setup-arm compile test clean

# Python caches the bytecode of what it imports (__pycache__); an environment that turns that off
# (PYTHONDONTWRITEBYTECODE=1, as on the machines this was measured on) makes every process compile
# torch, TVM and sliver again: ~5 s of CPU per process (tools/compile.py tiny_resnet 15.0 -> 9.9 s),
# paid by each of the suite's command-line and worker subprocesses.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml constraints.txt setup.py passes/appmul/_mckp.c
# --no-compile: no bytecode for torch & co. at install time (fresh-clone set-up 49.8 -> 32.4 s on a
# 2-core AMD EPYC); Python compiles the modules it imports on first use (make compile: 202 -> 194 s).
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt -e ".[dev]"
	# SCALE-Sim, the reference the FPGA cycle model is checked against; without its ~300 MB of
	# dependencies (numba, pandas, ...) that the classes the test uses do not need.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt scalesim
	@touch $(STAMP)

setup: $(STAMP)

# The aarch64 path: Debian's cross compiler and qemu-user (apt-get, as root), then the aarch64
# TVM runtime (pip download of the wheels matching the installed versions) and the runner of
# backends/runner/ built against it, in build/arm-runtime. tests/test_arm.py runs an artifact
# under qemu with them. Each step is skipped when its result is already there.
setup-arm: setup
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			g++-aarch64-linux-gnu qemu-user-static; \
	fi
	$(PY) -c "from sliver.backends import tvm; print('aarch64 runtime:', tvm.arm_runtime()['runner'])"

# The integer-ViT recipe on the trained tiny DeiT (trained on first use) with digits: accuracy of every
# stage, MACs, CPU latency (x86 artifact), FPGA latency and energy, bit-exactness, before and after.
compile: setup
	$(PY) tools/compile.py tiny_deit --data digits --recipe int-vit-fpga --target x86,fpga --compare-dense \
		--out build/tiny_deit

# One pytest worker per core (pytest-xdist), each test file on one worker so that its module
# fixtures are built once; the trained fixtures are shared through the training cache's lock.
# Most cases run one thread at a time (Python, ONNX export, LLVM code generation): two workers
# took the suite from 37 to 24 minutes on a 2-core machine. OMP_WAIT_POLICY=PASSIVE and
# TVM_THREAD_POOL_SPIN_COUNT=0: the workers' OpenMP and TVM threads sleep instead of spinning while
# they wait (two workers' spinning pools on two cores take CPU from each other). TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)

test: setup
	OMP_WAIT_POLICY=PASSIVE TVM_THREAD_POOL_SPIN_COUNT=0 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf build .pytest_cache

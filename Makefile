# The README's commands: `make demo` and `make test`. Both set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The CPU wheel of torch lies on local disk; install it before anything that depends on torch,
# else pip resolves a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
BUILD_DEPS := scikit-build-core pybind11 ninja cmake
# converter/*/__init__.py: the editable install maps each module to its file, so a new or
# moved package needs a fresh install
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*) $(wildcard converter/*/__init__.py)

.PHONY: install demo test test-fast test-isa test-next lint bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -Cbuild-dir=build/editable -e '.[transformers,test]'
	touch $(STAMP)

demo: install
	$(PY) -m converter.tools.demo

test: install
	TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Every CPU kernel path in turn: the tests that run our kernels through isa="auto" (loader forward, MoE
# experts, conversion, bnb compatibility) once per ISA this CPU runs, forced with pytest --isa (QM_CPU_ISA).
# The slow real-model tests compare bytes, which the kernel tests prove equal on every path: they run
# once, in `make test`.
ISA_TESTS ?= tests/kernels tests/loader tests/golden tests/compat tests/converter tests/moe
# make test already ran the best ISA (what isa="auto" picks); this runs the others this CPU has.
test-isa: install
	set -e; for isa in $$($(PY) -c "from converter.kernels import bnb4bit as kernels; print(*kernels.cpu_isas()[:-1])"); do \
		echo "== CPU kernels forced to $$isa"; \
		TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q --isa $$isa -m "not slow" $(ISA_TESTS); \
	done

# The newest transformers beside the pinned one (pyproject's test extra): `pip install
# quantize-model[transformers]` gives users the newest 5.x, and 5.25 changed a model class we load
# (LongCat-Flash's experts) and added seven. The whole suite again with it first on the path, installed
# without its dependencies into build/ (the venv keeps the pinned release); tests of model types the
# pinned release lacks run here instead of skipping.
TRANSFORMERS_NEXT ?= transformers==5.25.0 kernels==0.19.1
NEXT_SITE := $(CURDIR)/build/transformers-next
test-next: install
	rm -rf $(NEXT_SITE)
	$(PIP) install -q --no-deps --target $(NEXT_SITE) $(TRANSFORMERS_NEXT)
	PYTHONPATH=$(NEXT_SITE) TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/bench_cpu_quantize.py
	$(PY) bench/bench_convert.py
	cd /tmp && $(abspath $(PY)) $(abspath bench/bench_e2e.py) --rows smollm2,big --samples $(abspath .cache/samples)

clean:
	rm -rf build $(VENV) .pytest_cache

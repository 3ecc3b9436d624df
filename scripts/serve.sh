#!/usr/bin/env bash
# Sets up .venv if needed, then starts kvpack with its embedded default (in-memory store).
# Extra arguments go to `kvpack serve` (see `kvpack serve --help`).
source "$(dirname "$0")/env.sh"
exec kvpack serve "$@"

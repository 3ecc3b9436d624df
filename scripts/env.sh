# Sourced by the README commands: creates .venv (once) and installs kvpack with the extras
# named in KVPACK_EXTRAS into it; re-installs only when pyproject.toml or constraints change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
extras="${KVPACK_EXTRAS:-}"
stamp=".venv/.kvpack-installed${extras:+-$extras}"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "kvpack: installing into .venv (first run takes a few minutes)..." >&2
  # The grep drops pip's noise about optional local mirror folders some machines lack.
  .venv/bin/python -m pip install -q --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" 2> >(grep -v "^WARNING: Location" >&2)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"

#!/usr/bin/env bash
# The API reference (`make docs`): HTML pages generated offline from the docstrings by pdoc into docs/api/.
# Any warning pdoc prints (an annotation it cannot resolve, a module that fails to import) fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=docs/api
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rm -rf "$out"
"$PY" -m pdoc --docformat restructuredtext --no-search --footer-text "mentor API reference" -o "$out" mentor 2>"$log" \
  || { cat "$log" >&2; echo "make docs: pdoc failed" >&2; exit 1; }
if grep -qi "warn" "$log"; then
  cat "$log" >&2
  echo "make docs: pdoc printed warnings (above); fix the docstrings or annotations they name" >&2
  exit 1
fi
echo "API reference: $out/index.html ($(find "$out" -name '*.html' | wc -l) pages)"

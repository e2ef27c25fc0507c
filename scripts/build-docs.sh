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
# Every module: pdoc follows a package's submodules unless the package's __all__ leaves them out, so those
# are named as well (each once).
modules=$("$PY" - <<'PYEOF'
import importlib, pkgutil, mentor
names = ["mentor"]
for m in sorted(pkgutil.walk_packages(mentor.__path__, "mentor."), key=lambda m: m.name):
    parent, _, leaf = m.name.rpartition(".")
    exported = getattr(importlib.import_module(parent), "__all__", None)
    if exported is not None and leaf not in exported:  # pdoc would not follow it from its parent
        names.append(m.name)
print(" ".join(names))
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pdoc --docformat restructuredtext --no-search --footer-text "mentor API reference" -o "$out" $modules 2>"$log" \
  || { cat "$log" >&2; echo "make docs: pdoc failed" >&2; exit 1; }
if grep -qi "warn" "$log"; then
  cat "$log" >&2
  echo "make docs: pdoc printed warnings (above); fix the docstrings or annotations they name" >&2
  exit 1
fi
echo "API reference: $out/index.html ($(find "$out" -name '*.html' | wc -l) pages)"

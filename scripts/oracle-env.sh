#!/usr/bin/env bash
# Build .venv-oracle: a separate, optional test environment with alibi-detect as an
# oracle for tests/oracle/. alibi-detect is under the Business Source License and
# pins numpy<2, so it is never a dependency of Stethoscope; this environment exists
# only to cross-check our p-values against it.
#
# Usage: scripts/oracle-env.sh [PYTHON]      (default: python3.11)
#        .venv-oracle/bin/python -m pytest -q tests/oracle
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3.11}"
VENV=.venv-oracle
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# numpy<2 first so nothing later drags in numpy 2; alibi-detect without its
# TensorFlow/PyTorch extras (KSDrift, ChiSquareDrift need neither; MMDDrift's
# permutation test uses its PyTorch or TensorFlow backend, so torch-cpu is added).
"$VENV/bin/python" -m pip install -q "numpy<2" "scipy<1.14" "alibi-detect" pytest
"$VENV/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch || \
    "$VENV/bin/python" -m pip install -q torch || \
    echo "oracle-env: torch not installed: the MMD oracle test will be skipped" >&2
# This package, without extras (the server extra needs pyarrow/chdb built for numpy>=2
# on some platforms); the oracle tests import only analytics modules and SciPy.
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import alibi_detect, numpy, scipy
print("oracle env ready: alibi-detect", alibi_detect.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__)
PY

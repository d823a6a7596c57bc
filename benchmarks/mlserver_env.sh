#!/usr/bin/env bash
# The virtual environment benchmarks/mlserver_attack.py and tests/test_mlserver.py serve the target
# from: MLServer (Seldon) pins an older FastAPI/Starlette than Ray Serve, so it never goes into the
# main environment.
#
#   bash benchmarks/mlserver_env.sh     # creates it once (a few minutes), then prints its python
#
# Where: ${DRMI_MLSERVER_ENV:-$HOME/.cache/drmi-ray/mlserver-env}. Which python makes it:
# ${DRMI_MLSERVER_PYTHON:-python3} (MLServer 1.7 supports Python 3.9-3.12).
# Pinned: mlserver 1.7.1 and mlserver-sklearn 1.7.1 (the newest releases; both install here on
# Python 3.11: with fastapi 0.115, starlette 0.46, uvicorn, pandas, grpcio), scikit-learn at the
# version that python has (1.9.1 here: the model is pickled there, unpickled here), joblib.
# Idempotent: an existing environment whose `mlserver` and `mlserver_sklearn` import is left as is.
set -euo pipefail

ENV_DIR="${DRMI_MLSERVER_ENV:-$HOME/.cache/drmi-ray/mlserver-env}"
PY="$ENV_DIR/bin/python"
BASE="${DRMI_MLSERVER_PYTHON:-python3}"
# the scikit-learn that pickles the model (the main environment's) also unpickles it
SKLEARN="$("$BASE" -c 'import sklearn; print(sklearn.__version__)' 2>/dev/null || true)"
PINS=(mlserver==1.7.1 mlserver-sklearn==1.7.1 "scikit-learn${SKLEARN:+==$SKLEARN}" joblib)

if [ -x "$PY" ] && "$PY" -c "import mlserver, mlserver_sklearn, sklearn, joblib" 2>/dev/null \
    && [ -x "$ENV_DIR/bin/mlserver" ]; then
    echo "$PY"
    exit 0
fi

mkdir -p "$(dirname "$ENV_DIR")"
"$BASE" -m venv "$ENV_DIR" >&2
# pip's "Location ... is ignored" lines (index folders this machine lacks) are noise: dropped
quiet() { "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d' >&2; }
quiet "$PY" -m pip install --quiet --upgrade pip
quiet "$PY" -m pip install --quiet "${PINS[@]}"
"$PY" -c "import mlserver, mlserver_sklearn, sklearn, joblib" >&2
echo "$PY"

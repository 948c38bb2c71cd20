# Shared by scripts/demo and scripts/test: make .venv with Python >= 3.11 and install into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
if ! "$ROOT/.venv/bin/python" -m uv --version >/dev/null 2>&1; then
  "$ROOT/.venv/bin/python" -m pip --version >/dev/null 2>&1 || "$ROOT/.venv/bin/python" -m ensurepip >/dev/null
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip uv
fi
# --compile-bytecode: uv, unlike pip, leaves modules to be compiled when first imported, and where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every process compiles them again:
# importing Airflow and Ray took 5.8 s instead of 2.4 s, in every Airflow task, Ray worker and test
# subprocess. Compiling them once here costs ~30 s (docs/benchmarks.md, "bytecode").
install() {  # install "$ROOT[extras]" (uv resolves Airflow + Ray in seconds; pip takes minutes)
  "$ROOT/.venv/bin/python" -m uv pip install -q --compile-bytecode -p "$ROOT/.venv/bin/python" -e "$ROOT[$1]"
  # The checkout's own modules (an editable install): compileall writes even where Python won't.
  "$ROOT/.venv/bin/python" -m compileall -q -j 0 "$ROOT/airflow_ray" "$ROOT/tests" "$ROOT/examples" >/dev/null
}

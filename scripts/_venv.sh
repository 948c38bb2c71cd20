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
install() {  # install "$ROOT[extras]" (uv resolves Airflow + Ray in seconds; pip takes minutes)
  "$ROOT/.venv/bin/python" -m uv pip install -q -p "$ROOT/.venv/bin/python" -e "$ROOT[$1]"
}

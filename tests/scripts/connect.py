"""Connect to Ray through ``RayHook`` in a fresh process and report what happened, as JSON.

Ray caches the auth token per process, so each token case of ``tests/test_hooks.py`` runs here
with its own ``AIRFLOW_CONN_RAY_DEFAULT`` / ``RAY_AUTH_TOKEN_PATH`` environment.

Usage: ``python tests/scripts/connect.py``. Prints one line ``CONNECT=<json>`` with the result
of ``test_connection()``, and of ``connect()`` followed by a put/get through the object store.
"""

from __future__ import annotations

import json
import time

RESULT = "CONNECT="


def main() -> dict:
    from airflow_ray.hooks import RayHook

    hook = RayHook()
    report: dict = {"address": hook.target.address, "source": hook.target.source}
    report["test_connection"] = list(hook.test_connection())
    started = time.monotonic()
    try:
        hook.connect()
        import ray

        report["connect"] = "ok"
        report["roundtrip"] = ray.get(ray.put({"x": 1}))
        report["cpus"] = ray.cluster_resources().get("CPU")
    except Exception as exc:
        report["connect"] = f"{type(exc).__name__}: {exc}"
    report["connect_seconds"] = round(time.monotonic() - started, 2)
    return report


if __name__ == "__main__":
    print(RESULT + json.dumps(main()), flush=True)

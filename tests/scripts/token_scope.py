"""Connect to cluster A with its token, then reach cluster B, which has none; report as JSON.

A subprocess of ``tests/test_hooks.py`` (Ray caches the token per process, and the pytest
process must stay a driver of the session's head). ``ray_a`` is the session's head with its
token in the connection; ``ray_b`` is a Ray Client address and a dashboard where the test
records what arrives.

Usage: ``python tests/scripts/token_scope.py``. Prints one line ``TOKEN_SCOPE=<json>``.
"""

from __future__ import annotations

import json

RESULT = "TOKEN_SCOPE="


def main() -> dict:
    import ray

    from airflow_ray.hooks import RayHook, RayJobHook

    RayHook("ray_a").connect()
    report: dict = {"a_roundtrip": ray.get(ray.put("via A's token"))}
    report["b_probe"] = list(RayHook("ray_b").test_connection())
    try:
        RayJobHook("ray_b").get_job_status("some-job")
    except Exception as exc:  # the recorder answers 404: only the request matters
        report["b_dashboard"] = type(exc).__name__
    return report


if __name__ == "__main__":
    print(RESULT + json.dumps(main()), flush=True)

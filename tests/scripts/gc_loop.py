"""Run ``airflow-ray gc`` over and over until a stop file appears (tests/test_local_executor.py).

Usage: ``python tests/scripts/gc_loop.py <stop file> [gc arguments...]`` in the deployment's
environment. It prints ``READY`` once the deployment's identity exists (so no task races it into
being), and at the end one line ``GC_LOOP=<json>``: how many sweeps ran, their exit statuses, and
what the first sweeps that failed printed (the log included).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

RESULT = "GC_LOOP="


def main(stop: str, *gc_args: str) -> dict:
    from airflow_ray import cli, deployment

    deployment.current()
    print("READY", flush=True)
    sweeps, statuses, failures = 0, set(), []
    while not Path(stop).exists():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cli.main(["gc", *gc_args])
        sweeps += 1
        statuses.add(status)
        if status:
            failures.append(out.getvalue()[-3000:])
        time.sleep(0.05)  # a tight loop still, without starving the tasks of the 2-core CI machine
    return {"sweeps": sweeps, "statuses": sorted(statuses), "failures": failures[:3]}


if __name__ == "__main__":
    print(RESULT + json.dumps(main(*sys.argv[1:])), flush=True)

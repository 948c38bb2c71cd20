"""Run one ``@ray_task``-like call on the cluster of ``ray_remote`` in a fresh process, as a task would.

Started by ``tests/test_keeper.py``, once per "task process": each is a Ray driver of its own,
with its own short-lived Ray job. Prints one line ``WARM=<json>``: the pid of the Ray worker that
ran the function, and the seconds from connecting to the reply (the first one on a cluster
includes starting the owner, and the keeper when there is none).
"""

from __future__ import annotations

import json
import logging
import os
import time

RESULT = "WARM="


def main() -> dict:
    from airflow_ray import tasks
    from airflow_ray._worker.keys import TaskKey
    from airflow_ray.hooks import RayHook

    started = time.monotonic()
    RayHook("ray_remote").connect()
    request = tasks.TaskRequest(
        fn=os.getpid,
        args=(),
        kwargs={},
        task_key=TaskKey("warm", "run", f"task-{os.getpid()}", -1),
        inline_limit=None,  # the pid comes back as a value
    )
    reply = tasks.run(request, logging.getLogger("warm"))
    return {"pid": reply["outputs"][0]["value"], "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    print(RESULT + json.dumps(main()), flush=True)

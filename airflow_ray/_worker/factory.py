"""The actor that creates owner actors inside a live Ray job, and the keeper that hosts it anywhere.

A detached actor belongs to the Ray job of whoever created it, and Ray keeps idle worker
processes only for jobs that are still running. An owner created by an Airflow task process
belongs to a job that ends with the task, so every later ``@ray_task`` it runs waits for a new
worker process (1.7-2.5 s measured on a loaded 2-core machine). A driver that stays connected
has a live job: the factory (:class:`OwnerFactory`) runs in such a job, and so does every
owner it creates. Task processes of any deployment ask it for their owners.

Two drivers host it:

* on the embedded cluster, the keeper process started with the head
  (:mod:`airflow_ray.keeper`), which has airflow-ray installed;
* on any cluster, :class:`Keeper`: a detached actor on the head node whose child process is the
  driver (:func:`serve_factory`, shipped by value like the rest of this package, so the cluster
  needs only Ray). It is what Ray's Jobs API does for a job's entrypoint (a supervisor actor
  running the driver as a subprocess), without needing the dashboard: a task process that can
  reach the cluster can start it. The actor outlives the process that created it, restarts its
  driver when that exits, and Ray restarts the actor itself if its worker dies.

The factory is not detached: it dies with its driver, so a factory that is found always has a
live job behind it. Owners created through a factory whose driver has since died keep working,
only without warm workers (their job ended): they are not recreated, they hold outputs.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from typing import Any

#: Where the factory and its keeper run: no CPU, on the head node (which outlives worker nodes).
ON_HEAD: dict[str, Any] = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
#: What the keeper's child process runs: the pickled callable it reads from its stdin.
_BOOT = "import sys, ray.cloudpickle as p; p.loads(sys.stdin.buffer.read())()"
READY_LINE = "AIRFLOW_RAY_FACTORY_READY"
_RESTART_DELAYS_S = (1.0, 5.0, 30.0, 60.0)
_TAIL_LINES = 40


class OwnerFactory:
    """Creates named detached actors in this actor's (its driver's) Ray job."""

    def create(self, cls: type, options: dict[str, Any], args: tuple[Any, ...]) -> None:
        """Create ``cls`` with ``options`` (a name, ``get_if_exists``) and wait until it answers."""
        import ray

        handle: Any = ray.remote(cls).options(**options).remote(*args)
        ray.get(handle.__ray_ready__.remote())


def start_factory(name: str, namespace: str) -> Any:
    """Create the named factory in the calling driver's job (or find the one that exists)."""
    import ray

    options = {**ON_HEAD, "name": name, "namespace": namespace, "get_if_exists": True}
    return ray.remote(OwnerFactory).options(**options).remote()


def serve_factory(name: str, namespace: str) -> None:
    """The keeper's driver: connect, start the factory, say so on stdout, live as long as the keeper.

    Runs in a child process of :class:`Keeper` (``RAY_ADDRESS`` names the cluster). It polls its
    parent rather than trusting Ray to end it: a driver that outlived its keeper would hold a
    factory nobody can stop.
    """
    import ray

    ray.init(namespace=namespace, log_to_driver=False, configure_logging=False)
    factory = start_factory(name, namespace)
    ray.get(factory.__ray_ready__.remote())
    print(f"{READY_LINE} job {ray.get_runtime_context().get_job_id()} pid {os.getpid()}", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)


class Keeper:
    """Runs a driver process (a pickled callable, :func:`serve_factory`) and restarts it when it exits.

    A threaded actor: :meth:`ready` waits while :meth:`info` and :meth:`stop` answer.
    """

    def __init__(self, driver: bytes) -> None:
        import ray

        self._driver = driver
        self._address = ray.get_runtime_context().gcs_address
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._starts = 0
        self._error: str | None = None
        self._ready_line = ""
        threading.Thread(target=self._supervise, name="airflow-ray-keeper", daemon=True).start()

    def ready(self, timeout: float) -> str | None:
        """Wait until the factory answers: None, or why it does not yet (the driver's last output)."""
        with self._lock:
            self._changed.wait_for(
                lambda: self._ready.is_set() or self._error is not None or self._stopping, timeout
            )
            if self._ready.is_set():
                return None
            if self._error is None and not self._stopping:
                return f"the factory's driver did not report ready within {timeout:.0f} s"
            return self._error or "the keeper is stopping"

    def info(self) -> dict[str, Any]:
        """What ``airflow-ray cluster status`` shows: the driver's pid, readiness, starts, last error."""
        with self._lock:
            proc = self._proc
            return {
                "keeper_pid": os.getpid(),
                "driver_pid": proc.pid if proc is not None and proc.poll() is None else None,
                "ready": self._ready.is_set(),
                "driver": self._ready_line,
                "starts": self._starts,
                "error": self._error,
            }

    def stop(self) -> None:
        """End the driver (and with it the factory); the caller then kills this actor."""
        with self._lock:
            self._stopping = True
            proc = self._proc
            self._changed.notify_all()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- the child process -----------------------------------------------------------------

    def _supervise(self) -> None:
        for attempt in range(sys.maxsize):
            code = self._run_driver()
            with self._lock:
                if self._stopping:
                    return
                tail = "\n".join(self._tail)
                self._error = f"the factory's driver exited with status {code}; its last output:\n{tail}"
                self._changed.notify_all()
            time.sleep(_RESTART_DELAYS_S[min(attempt, len(_RESTART_DELAYS_S) - 1)])

    def _run_driver(self) -> int:
        env = {**os.environ, "RAY_ADDRESS": self._address}
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        with self._lock:
            self._proc = proc
            self._starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(self._driver)
        proc.stdin.close()
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            print(line, flush=True)  # into this actor's log (`ray logs actor --id ...`)
            with self._lock:
                self._tail.append(line)
                if line.startswith(READY_LINE):
                    self._ready_line = line.removeprefix(READY_LINE).strip()
                    self._error = None
                    self._ready.set()
                    self._changed.notify_all()
        code = proc.wait()
        with self._lock:
            self._ready.clear()
        return code

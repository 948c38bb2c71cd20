"""Who produced an output: the task-instance key and the output key, as both sides spell them.

They are named tuples on purpose: they travel between Airflow processes and owner actors
(pickled by value with the rest of this package), and a tuple's equality and hash do not
depend on which copy of the class built it, so a key made in one Airflow process finds the
entry another process registered. Slicing gives the run (``key[:2]``) or the task (``key[:4]``).

>>> key = TaskKey("etl", "manual__1", "extract", 3)
>>> key.describe()
"task 'extract'[3] of DAG 'etl', run 'manual__1'"
>>> key.output("return_value")[:4] == key
True
"""

from __future__ import annotations

from typing import NamedTuple


class TaskKey(NamedTuple):
    """One task instance: ``(dag_id, run_id, task_id, map_index)``; ``map_index`` -1 when not mapped."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def describe(self) -> str:
        """How errors and logs name the task instance."""
        index = "" if self.map_index < 0 else f"[{self.map_index}]"
        return f"task '{self.task_id}'{index} of DAG '{self.dag_id}', run '{self.run_id}'"

    def output(self, key: str) -> OutputKey:
        """The key of one of this task instance's outputs (an XCom key)."""
        return OutputKey(self.dag_id, self.run_id, self.task_id, self.map_index, key)


class TaskInstanceInfo(NamedTuple):
    """What a ``@ray_task`` function receives as ``ti``: a read-only snapshot of the task instance.

    The live task instance holds Airflow's clients and cannot travel to a Ray worker.
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int


class OutputKey(NamedTuple):
    """One output of a task instance: its :class:`TaskKey` plus the XCom key."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str

    @property
    def task(self) -> TaskKey:
        return TaskKey(self.dag_id, self.run_id, self.task_id, self.map_index)

    def describe(self) -> str:
        return f"{self.task.describe()}, key '{self.key}'"

"""Everything that runs on the Ray cluster: owners, task runner, checkpoints, tracking, Serve.

This package is Ray-side. Its modules import only the standard library, Ray and the data
libraries they handle (numpy, pandas, pyarrow, fsspec), never Airflow and never the rest of
``airflow_ray`` (a test checks it). It is shipped to the cluster by value as a whole
(:func:`airflow_ray.owners.ship_worker_code`), so a remote cluster needs Ray, not airflow-ray,
and the owner actors' names carry a hash of its source: any change to it gets fresh actors.
"""

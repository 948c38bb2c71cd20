"""What runs in Ray Serve replicas: one MLflow model behind HTTP, and its request format.

:class:`~airflow_ray.operators.serve.RayServeDeployOperator` deploys :class:`MlflowModelServer`;
this module is Ray-side (standard library, Ray, MLflow, pandas) and travels by value, so the
cluster needs MLflow but not airflow-ray or Airflow.

Requests use MLflow's scoring format, so a client of ``mlflow models serve`` works unchanged::

    POST /<route_prefix>   {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}
                           {"dataframe_records": [{"a": 1, "b": 2}]}
                           {"inputs": [[1, 2], [3, 4]]}
    200                    {"predictions": [0.12, 0.93], "model_uri": "models:/higgs/3"}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_ray._worker.tracking import mlflow_environment

if TYPE_CHECKING:
    import pandas as pd
    from starlette.requests import Request


class MlflowModelServer:
    """A Serve deployment: loads ``model_uri`` (a pinned ``models:/name/version``) once per replica.

    Loading happens in the constructor, so a model that cannot load fails the deployment
    (Serve marks it ``DEPLOY_FAILED``) instead of failing every request later. It is also the
    only time the replica talks to MLflow: the credentials are set for the loading only, and a
    request never finds them in the replica's environment.
    """

    def __init__(self, model_uri: str, tracking_uri: str, mlflow_env: Mapping[str, str]) -> None:
        import mlflow.pyfunc

        self.model_uri = model_uri
        with mlflow_environment(tracking_uri, mlflow_env):
            self.model = mlflow.pyfunc.load_model(model_uri)

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"predictions": predict(self.model, await request.json()), "model_uri": self.model_uri}

    def describe(self) -> dict[str, Any]:
        """What this replica serves (the operator asks it before replacing or rolling back)."""
        return {"model_uri": self.model_uri}


def predict(model: Any, payload: Mapping[str, Any]) -> list[Any]:
    """The model's predictions for one request, as JSON-able values."""
    import numpy as np

    return np.asarray(model.predict(frame(payload))).tolist()


def frame(payload: Mapping[str, Any]) -> pd.DataFrame:
    """The request body as the DataFrame a pyfunc model takes."""
    import pandas as pd

    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        return pd.DataFrame(split["data"], columns=split.get("columns"))
    if "dataframe_records" in payload:
        return pd.DataFrame.from_records(payload["dataframe_records"])
    if "inputs" in payload:
        return pd.DataFrame(payload["inputs"])
    raise ValueError(
        f"Expected one of dataframe_split, dataframe_records or inputs in the request, got {sorted(payload)}"
    )


def reference_predictions(
    model_uri: str, tracking_uri: str, mlflow_env: Mapping[str, str], payload: Mapping[str, Any]
) -> list[Any]:
    """The registered model's own answer to ``payload``, computed outside Serve (a Ray task).

    What the smoke test compares the served answer with when the DAG gives no expected one.
    """
    import mlflow.pyfunc

    with mlflow_environment(tracking_uri, mlflow_env):
        model = mlflow.pyfunc.load_model(model_uri)
    return predict(model, payload)

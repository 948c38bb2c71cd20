"""Test DAGs for Ray Serve: deploy a registered MLflow model (smoke-tested), and the teardown.

The test starts Serve on a free loopback port and passes its URL, the model URI and the expected
answer as DAG params.
"""

from __future__ import annotations

from airflow.sdk import dag

from airflow_ray.operators import RayServeDeleteOperator, RayServeDeployOperator

APP = "tests-model"
#: Three rows of the tracked test DAGs' 8-feature problem.
SMOKE_ROWS = [
    [0.5, -1.2, 0.3, 2.0, -0.7, 0.1, 1.1, -0.4],
    [-1.5, 0.8, -0.2, -0.3, 1.4, -2.0, 0.0, 0.9],
    [2.2, 0.1, 1.7, -1.1, 0.2, 0.6, -0.8, 1.3],
]


@dag(
    dag_id="serve_model",
    schedule=None,
    render_template_as_native_obj=True,
    params={"model_uri": "", "expected": None, "serve_url": ""},
)
def serve_model():
    RayServeDeployOperator(
        task_id="deploy",
        app_name=APP,
        model_uri="{{ params.model_uri }}",
        smoke_request={"inputs": SMOKE_ROWS},
        expected_predictions="{{ params.expected }}",
        serve_url="{{ params.serve_url }}",
        ray_actor_options={"num_cpus": 0.25},
        startup_timeout=180,
    )


@dag(dag_id="serve_teardown", schedule=None)
def serve_teardown():
    RayServeDeleteOperator(task_id="undeploy", app_name=APP)


serve_model_dag = serve_model()
serve_teardown_dag = serve_teardown()

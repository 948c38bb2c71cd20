"""Provider metadata: how Airflow discovers the ``ray`` connection type, ``@task.ray`` and our config."""

from __future__ import annotations

from typing import Any

from airflow_ray.config import OPTIONS, SECTION
from airflow_ray.version import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-ray",
        "name": "Ray",
        "description": "Run Python functions on Ray from Airflow 3, with Ray's object store as XCom.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Ray",
                "external-doc-url": "https://docs.ray.io/",
                "tags": ["compute"],
            }
        ],
        "operators": [
            {
                "integration-name": "Ray",
                "python-modules": [
                    "airflow_ray.operators.python",
                    "airflow_ray.operators.job",
                    "airflow_ray.operators.serve",
                ],
            }
        ],
        "hooks": [
            {"integration-name": "Ray", "python-modules": ["airflow_ray.hooks.ray", "airflow_ray.hooks.job"]}
        ],
        "triggers": [{"integration-name": "Ray", "python-modules": ["airflow_ray.triggers.job"]}],
        "extra-links": ["airflow_ray.links.dashboard.RayDashboardLink"],
        "connection-types": [
            {
                "hook-class-name": "airflow_ray.hooks.RayHook",
                "hook-name": "Ray",
                "connection-type": "ray",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login"],
                    "relabeling": {"host": "Address", "password": "Auth token"},
                    "placeholders": {
                        "host": "ray://head:10001, auto, head:6379 or anyscale://…",
                        "port": "only if not part of the address",
                        "password": "token of a cluster with Ray token auth (RAY_AUTH_TOKEN)",
                    },
                },
                "conn-fields": {
                    "namespace": {
                        "label": "Namespace",
                        "description": "Ray namespace for the driver (ray.init(namespace=...)).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "runtime_env": {
                        "label": "Runtime environment (JSON)",
                        "description": "Default runtime_env of every task; a task's own is merged over it.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "init_kwargs": {
                        "label": "Extra ray.init kwargs (JSON)",
                        "description": "Passed to ray.init as keyword arguments.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "dashboard_url": {
                        "label": "Dashboard URL",
                        "description": "Ray dashboard / Jobs API, e.g. http://head:8265.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
            }
        ],
        "task-decorators": [{"class-name": "airflow_ray.decorators.ray.ray_task", "name": "ray"}],
        "config": {
            SECTION: {
                "description": "airflow-ray: Ray clusters, the Ray XCom backend and checkpoints.",
                "options": {name: {**option, "version_added": "0.1.0"} for name, option in OPTIONS.items()},
            }
        },
    }

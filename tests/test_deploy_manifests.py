"""The deployment manifests in ``docs/deploy/`` are well-formed, and say what airflow-ray's code says.

There is no Kubernetes here, so nothing is applied to a cluster. Instead each manifest is validated
against a JSON Schema in ``tests/schemas/`` (written from the KubeRay CRD and the Airflow Helm
chart's schema at the commits each schema's description records; a misspelt field, a wrong type or
``apiVersion`` fails), and what the manifests name is checked against the code: the ``[ray]``
options against :data:`airflow_ray.config.OPTIONS`, the XCom backend, the deployment secret's
Variable, the ``ray_default`` connection (resolved by :class:`~airflow_ray.hooks.RayHook`), and the
Ray, Airflow and Python versions on both sides. Fast, no network.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from airflow_ray import config, deployment
from airflow_ray.hooks import RayHook
from tests.conftest import CLUSTER_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
SCHEMAS = ROOT / "tests" / "schemas"
VALUES = DEPLOY / "airflow-values.yaml"
#: The schema of each Kubernetes object kind the manifests hold.
KIND_SCHEMAS = {
    "RayCluster": "raycluster.schema.json",
    "Secret": "secret.schema.json",
    "NetworkPolicy": "networkpolicy.schema.json",
}


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def problems(document: Any, schema_name: str) -> list[str]:
    """Every schema violation of a document, as ``path: message`` (empty when it is valid)."""
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=str)
    ]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in the manifests, by ``file:Kind/name``."""
    objects = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path == VALUES:
            continue
        for document in yaml.safe_load_all(path.read_text()):
            objects[f"{path.name}:{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        doc for doc in k8s_objects().values() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    return found


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def values_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in values()["env"]}


def ray_cluster() -> dict[str, Any]:
    (cluster,) = [doc for doc in k8s_objects().values() if doc["kind"] == "RayCluster"]
    return cluster


def airflow_secret_data() -> dict[str, str]:
    """``envName -> value`` of the Helm values' ``secret`` entries, read from the Secret manifests."""
    data = {}
    for entry in values()["secret"]:
        secret = k8s_object("Secret", entry["secretName"])
        data[entry["envName"]] = secret["stringData"][entry["secretKey"]]
    return data


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", sorted(p.name for p in SCHEMAS.glob("*.schema.json")))
def test_the_schemas_are_valid_and_say_where_they_come_from(name):
    document = schema(name)
    jsonschema.Draft202012Validator.check_schema(document)
    assert re.search(r"\b[0-9a-f]{40}\b", document["description"]), f"{name}: record the source commit"


@pytest.mark.parametrize("where", sorted(k8s_objects()))
def test_each_kubernetes_manifest_matches_its_schema(where):
    document = k8s_objects()[where]
    assert document["kind"] in KIND_SCHEMAS, f"{where}: no schema for kind {document['kind']}"
    assert problems(document, KIND_SCHEMAS[document["kind"]]) == []


def test_the_helm_values_match_their_schema():
    assert problems(values(), "airflow-values.schema.json") == []


def _parent(document: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The node holding ``a/b/0/c`` (list indices as digits), and the last key."""
    *parents, last = [int(part) if part.isdigit() else part for part in path.split("/")]
    node: Any = document
    for part in parents:
        node = node[part]
    return node, last


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: a wrong value at ``path``."""

    def mutate(document: dict[str, Any]) -> None:
        node, key = _parent(document, path)
        node[key] = value

    return mutate


def _rename(path: str, new: str) -> Callable[[dict[str, Any]], None]:
    """A mutation: the key at ``path`` misspelt as ``new``."""

    def mutate(document: dict[str, Any]) -> None:
        node, key = _parent(document, path)
        node[new] = node.pop(key)

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    """A mutation: the key at ``path`` left out."""

    def mutate(document: dict[str, Any]) -> None:
        node, key = _parent(document, path)
        del node[key]

    return mutate


RAYCLUSTER = "raycluster.yaml:RayCluster/airflow-ray"
SECRET = "airflow-secrets.yaml:Secret/airflow-ray"
POLICY = "networkpolicy.yaml:NetworkPolicy/airflow-ray-head"


@pytest.mark.parametrize(
    ("where", "mutate", "complaint"),
    [
        pytest.param(
            RAYCLUSTER,
            _rename("spec/headGroupSpec/rayStartParams", "rayStartParam"),
            "'rayStartParam' was unexpected",
            id="typo-rayStartParam",
        ),
        pytest.param(
            RAYCLUSTER,
            _set("spec/enableInTreeAutoscaling", "yes"),
            "'yes' is not of type 'boolean'",
            id="autoscaling-yes",
        ),
        pytest.param(
            RAYCLUSTER, _set("apiVersion", "ray.io/v1alpha1"), "'ray.io/v1' was expected", id="apiVersion"
        ),
        pytest.param(RAYCLUSTER, _set("spec/authOptions/mode", "tokens"), "is not one of", id="auth-mode"),
        pytest.param(
            RAYCLUSTER,
            _set("spec/headGroupSpec/rayStartParams/num-cpus", 0),
            "0 is not of type 'string'",
            id="rayStartParams-not-string",
        ),
        pytest.param(
            RAYCLUSTER,
            _drop("spec/workerGroupSpecs/0/groupName"),
            "'groupName' is a required",
            id="groupName",
        ),
        pytest.param(
            RAYCLUSTER,
            _set("spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/memory", "32GB"),
            "is not valid under any of the given schemas",
            id="quantity",
        ),
        pytest.param(
            SECRET, _set("stringData/deployment_secret", 1234), "1234 is not of type 'string'", id="secret"
        ),
        pytest.param(
            POLICY, _set("spec/policyTypes", ["Inbound"]), "'Inbound' is not one of", id="policyTypes"
        ),
        pytest.param(
            POLICY,
            _set("spec/ingress/1/ports/0/port", 70000),
            "is not valid under any",
            id="port-out-of-range",
        ),
    ],
)
def test_the_schemas_refuse_typos_and_wrong_types(where, mutate, complaint):
    document = copy.deepcopy(k8s_objects()[where])
    mutate(document)
    found = problems(document, KIND_SCHEMAS[document["kind"]])
    assert any(complaint in problem for problem in found), found


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        pytest.param(_rename("executor", "executer"), "'executer' was unexpected", id="typo-executer"),
        pytest.param(_set("executor", "Celery"), "does not match", id="executor-name"),
        pytest.param(_drop("env/0/value"), "'value' is a required property", id="env-without-value"),
        pytest.param(_rename("secret/0/secretKey", "key"), "'key' was unexpected", id="secret-key-name"),
        pytest.param(_set("networkPolicies/enabled", "true"), "'true' is not of type 'boolean'", id="bool"),
    ],
)
def test_the_values_schema_refuses_typos_and_wrong_types(mutate, complaint):
    document = copy.deepcopy(values())
    mutate(document)
    found = problems(document, "airflow-values.schema.json")
    assert any(complaint in problem for problem in found), found


# --------------------------------------------------------------------------- the manifests and the code


def test_every_airflow_option_the_values_set_exists():
    """``AIRFLOW__RAY__*`` are airflow-ray options with values of their type; other sections are
    Airflow's own; the XCom backend is the importable ``RayXComBackend``."""
    from airflow.configuration import conf

    env = values_env()
    for name, value in env.items():
        section, _, option = name.removeprefix("AIRFLOW__").lower().partition("__")
        assert name.startswith("AIRFLOW__") and option, f"{name}: not an Airflow config variable"
        if section == config.SECTION:
            assert option in config.OPTIONS, f"{name}: no [ray] {option} in airflow_ray.config.OPTIONS"
            kind = config.OPTIONS[option]["type"]
            if kind == "integer":
                int(value)
            elif kind == "boolean":
                assert value.lower() in {"true", "false"}, f"{name}={value!r}: not a boolean"
        else:
            assert conf.has_option(section, option), f"{name}: Airflow has no [{section}] {option}"
    backend = env["AIRFLOW__CORE__XCOM_BACKEND"]
    assert backend == "airflow_ray.xcom.RayXComBackend"
    module, _, name = backend.rpartition(".")
    assert getattr(importlib.import_module(module), name).__name__ == name


def test_the_helm_secrets_name_what_airflow_ray_reads():
    """Each ``secret`` entry points at a key of a Secret manifest, under the name airflow-ray reads."""
    data = airflow_secret_data()
    assert set(data) == {
        f"AIRFLOW_CONN_{config.OPTIONS['xcom_conn_id']['default'].upper()}",
        f"AIRFLOW_VAR_{deployment.VARIABLE.upper()}",
    }
    assert RayHook.default_conn_name == config.OPTIONS["xcom_conn_id"]["default"]


def test_the_connection_reaches_the_rayclusters_head_service(monkeypatch):
    """RayHook resolves the Secret's connection to the Ray Client port of the RayCluster's head
    service (KubeRay names it ``<cluster>-head-svc``), with the token and the Jobs API URL."""
    for name, value in airflow_secret_data().items():
        monkeypatch.setenv(name, value)
    for var in ("RAY_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    conn = json.loads(airflow_secret_data()[f"AIRFLOW_CONN_{RayHook.default_conn_name.upper()}"])

    target = RayHook().target

    cluster = ray_cluster()
    head = f"{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}.svc.cluster.local"
    ports = {
        p["name"]: p["containerPort"]
        for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert target.is_client and target.address == f"ray://{head}:{ports['client']}"
    assert target.token == conn["password"] and target.env["RAY_AUTH_MODE"] == "token"
    assert RayHook().get_dashboard().url == f"http://{head}:{ports['dashboard']}"


def test_the_deployment_secret_and_id_reach_airflow_ray(monkeypatch):
    """The Variable's environment name and ``[ray] deployment_id`` are the ones airflow-ray reads."""
    (secret_env,) = [name for name in airflow_secret_data() if name.startswith("AIRFLOW_VAR_")]
    monkeypatch.setenv(secret_env, "ab" * 32)  # the manifest holds a placeholder
    monkeypatch.setenv("AIRFLOW__RAY__DEPLOYMENT_ID", values_env()["AIRFLOW__RAY__DEPLOYMENT_ID"])
    config.clear_caches()
    try:
        current = deployment.current()
    finally:
        config.clear_caches()
    assert current.id == values_env()["AIRFLOW__RAY__DEPLOYMENT_ID"]
    assert current.key == bytes.fromhex("ab" * 32)


def test_the_token_secret_is_the_one_the_raycluster_names():
    auth = ray_cluster()["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = k8s_object("Secret", auth["secretName"])
    assert "auth_token" in secret["stringData"]  # the key KubeRay reads
    assert secret["metadata"]["namespace"] == ray_cluster()["metadata"]["namespace"]


def test_versions_agree_across_images_manifests_and_package():
    """Ray Client and drivers need the same Ray release and Python minor version on both sides."""
    dependencies = {
        Requirement(spec).name: Requirement(spec)
        for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    ray_version = ray_cluster()["spec"]["rayVersion"]
    assert dependencies["ray"].specifier.contains(ray_version), (ray_version, dependencies["ray"])

    ray_image = re.search(
        r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)$", (DEPLOY / "ray.Dockerfile").read_text(), re.M
    )
    airflow_image = re.search(
        r"^FROM apache/airflow:(\S+)-python(\d)\.(\d+)$", (DEPLOY / "airflow.Dockerfile").read_text(), re.M
    )
    assert ray_image and airflow_image
    assert ray_image[1] == ray_version
    assert ray_image.groups()[1:] == airflow_image.groups()[1:], "Python minor versions differ"
    python = "".join(ray_image.groups()[1:])
    for group in [ray_cluster()["spec"]["headGroupSpec"], *ray_cluster()["spec"]["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].endswith(f":{ray_version}-py{python}"), container["image"]

    airflow_version = values()["airflowVersion"]
    assert airflow_image[1] == airflow_version
    assert f'"apache-airflow=={airflow_version}"' in (DEPLOY / "airflow.Dockerfile").read_text()
    assert values()["defaultAirflowTag"] == f"{airflow_version}-python{python[0]}.{python[1:]}"
    assert dependencies["apache-airflow"].specifier.contains(airflow_version)


def test_the_ray_image_has_what_the_ray_side_needs():
    """What tests/test_bare_cluster.py runs a cluster with (Ray comes with the base image)."""
    installed = re.search(
        r"^RUN pip install --no-cache-dir (.+)$", (DEPLOY / "ray.Dockerfile").read_text(), re.M
    )
    assert installed
    assert set(CLUSTER_PACKAGES) - {"ray"} <= set(installed[1].split())

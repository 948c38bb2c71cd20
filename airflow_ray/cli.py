"""``airflow-ray``: manage the embedded local Ray cluster and the keepers of any cluster.

.. code-block:: console

    $ airflow-ray cluster start     # start it now instead of on the first task
    $ airflow-ray cluster status    # address, resources, object store use, keepers
    $ airflow-ray cluster stop
    $ airflow-ray cluster prepare --connection ray_prod          # start its keeper now
    $ airflow-ray cluster status --connection ray_prod           # resources and keepers there
    $ airflow-ray cluster prepare --connection ray_prod --stop   # stop it
    $ airflow-ray gc                # free objects of deleted runs / cleared XComs, expire checkpoints
    $ airflow-ray deployment        # this deployment's id; creates its identity before the first run
    $ airflow-ray doctor --connection ray_default   # check a connection end to end (exit 1 on failure)

``gc`` is safe to run while DAG runs execute: it never frees what is younger than
``[ray] gc_grace_seconds`` or belongs to an unfinished task or run, and it deletes checkpoints only
under bases this deployment marked as its own (see :mod:`airflow_ray.retention`).
"""

from __future__ import annotations

import argparse
import json
import sys

from airflow_ray import cluster
from airflow_ray._api import public_api


@public_api("stable")
def main(argv: list[str] | None = None) -> int:
    """The ``airflow-ray`` command (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="airflow-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="group", required=True)
    cluster_parser = sub.add_parser(
        "cluster",
        help="the embedded local Ray cluster (start, stop, status), or the keeper of any cluster "
        "(prepare, status --connection)",
    )
    cluster_parser.add_argument("action", choices=["start", "stop", "status", "prepare"])
    cluster_parser.add_argument("--json", action="store_true", help="machine-readable status")
    cluster_parser.add_argument(
        "--connection",
        metavar="ID",
        help="prepare / status: the cluster of this Airflow connection (type ray) instead of the "
        "default resolution (ray_default, RAY_URL, RAY_ADDRESS, the embedded cluster)",
    )
    cluster_parser.add_argument(
        "--stop", action="store_true", help="prepare: stop this version's keeper instead of starting it"
    )
    cluster_parser.add_argument(
        "--all-versions", action="store_true", help="prepare --stop: stop the keepers of every version"
    )
    gc_parser = sub.add_parser(
        "gc",
        help="free Ray objects whose XCom rows are gone, expire checkpoints (needs the metadata DB; "
        "safe while DAG runs execute: see [ray] gc_grace_seconds)",
    )
    gc_parser.add_argument("--dry-run", action="store_true", help="only count what would be freed")
    gc_parser.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="URI",
        help="also expire checkpoints under this base (repeatable; [ray] checkpoint_path is always included; "
        "only a base this deployment wrote checkpoints to, which carries its marker, is touched)",
    )
    gc_parser.add_argument("--checkpoint-source", help="connection id with the credentials for --checkpoints")
    sub.add_parser(
        "deployment",
        help="print this Airflow deployment's id on shared Ray clusters, creating its secret (the "
        "Airflow Variable airflow_ray_deployment_secret) if there is none (needs the metadata DB)",
    )
    doctor_parser = sub.add_parser(
        "doctor",
        help="check a Ray connection end to end (address, token, versions, nodes, owners, object store, "
        "dashboard, checkpoint base); one line per check, exit status 1 if any failed",
    )
    doctor_parser.add_argument(
        "--connection", default="ray_default", metavar="ID", help="the ray connection id"
    )
    doctor_parser.add_argument(
        "--checkpoint-path",
        metavar="URI",
        help="the checkpoint base to check (default: [ray] checkpoint_path)",
    )
    doctor_parser.add_argument("--checkpoint-source", metavar="ID", help="connection id with its credentials")
    args = parser.parse_args(argv)
    if args.group == "doctor":
        return _doctor(args.connection, args.checkpoint_path, args.checkpoint_source)
    if args.group == "deployment":
        return _deployment()
    if args.group == "gc":
        return _gc(dry_run=args.dry_run, bases=args.checkpoints, source=args.checkpoint_source)
    if args.action == "prepare":
        return _prepare(args.connection, stop=args.stop, all_versions=args.all_versions)
    if args.connection is not None:
        if args.action != "status":
            parser.error(
                "--connection goes with prepare and status; start and stop are the embedded cluster's"
            )
        return _remote_status(args.connection, as_json=args.json)
    return _cluster(args.action, as_json=args.json)


def _connect(conn_id: str | None) -> str:
    """Become a driver of the cluster of ``conn_id`` (None: the default resolution); its description.

    A named connection must exist: falling through to RAY_ADDRESS or the embedded cluster would
    prepare some other cluster than the one asked for.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    from airflow_ray.hooks import RayHook

    hook = RayHook(conn_id or RayHook.default_conn_name)
    if conn_id is not None:
        try:
            hook.get_connection(conn_id)
        except AirflowNotFoundException:
            raise SystemExit(
                f"airflow-ray: no Airflow connection {conn_id!r}. Create it (e.g. `airflow connections "
                f"add {conn_id} --conn-type ray --conn-host ray://head:10001`) or leave out --connection "
                "to use ray_default, RAY_URL, RAY_ADDRESS or the embedded cluster."
            ) from None
    return hook.connect().describe()


def _prepare(conn_id: str | None, *, stop: bool, all_versions: bool) -> int:
    """Start (or with ``stop`` stop) the keeper of a cluster; exit status 1 when it cannot start."""
    from airflow_ray import keeper

    where = _connect(conn_id)
    if stop:
        stopped = keeper.stop(all_versions=all_versions)
        print(f"stopped {', '.join(stopped)} on {where}" if stopped else f"no keeper to stop on {where}")
        return 0
    try:
        print(f"{keeper.prepare()} on {where}")
    except keeper.KeeperError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _remote_status(conn_id: str, *, as_json: bool) -> int:
    """Nodes, resources and keepers of the cluster of a connection (as a driver of it)."""
    import ray

    from airflow_ray import keeper

    info = {
        "address": _connect(conn_id),
        "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        "resources": ray.cluster_resources(),
        "keepers": keeper.describe(),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"address:       {info['address']}")
    print(f"nodes:         {info['nodes']}")
    print(f"resources:     {_resources(info['resources'])}")
    _print_keepers(info["keepers"])
    return 0


def _print_keepers(found: list[dict]) -> None:
    if not found:
        print("keepers:       none (Ray tasks start a new worker process each until one runs)")
    for entry in found:
        mark = "" if entry["this_version"] else " (another version)"
        if "starts" not in entry:  # a factory
            print(f"factory:       {entry['name']}{mark}")
            continue
        state = "ready" if entry.get("ready") else f"NOT ready: {entry.get('error')}"
        print(
            f"keeper:        {entry['name']}{mark}: {state}; driver {entry.get('driver') or '-'}, "
            f"started {entry.get('starts', 0)} time(s)"
        )


def _gc(*, dry_run: bool, bases: list[str], source: str | None) -> int:
    """Exit status 1 when a base was refused (not this deployment's) or something could not be
    freed or deleted (logged); everything else was still swept."""
    from airflow_ray import checkpoint, config, retention

    counts = retention.collect(dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    print(
        f"{verb} {counts['freed']} Ray objects whose XCom rows are gone; "
        f"kept {counts['kept']}{_failed(counts)}"
    )
    status = 1 if counts["failed"] else 0
    if default_base := config.checkpoint_path():
        bases = [default_base, *bases]
    for base in dict.fromkeys(bases):
        options = checkpoint.storage_options_for(base, source)
        try:
            result = retention.expire_checkpoints(
                base, options, retention_seconds=config.checkpoint_retention_seconds(), dry_run=dry_run
            )
        except checkpoint.CheckpointBaseError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        verb = "would delete" if dry_run else "deleted"
        print(
            f"{verb} checkpoints of {result['deleted']} deleted or expired runs under {base}; "
            f"kept {result['kept']}{_failed(result)}"
        )
        status = 1 if result["failed"] else status
    return status


def _deployment() -> int:
    """Print this deployment's id, creating its secret first if there is none: run once before
    the first DAG run, and no two tasks of a new deployment race to create it."""
    from airflow_ray import deployment

    me, created = deployment.init()
    state = "created" if created else "set"
    print(f"deployment id: {me.id} (Airflow Variable {deployment.VARIABLE}: {state})")
    return 0


def _doctor(conn_id: str, checkpoint_path: str | None, checkpoint_source: str | None) -> int:
    from airflow_ray import doctor

    checks = doctor.diagnose(conn_id, checkpoint_path=checkpoint_path, checkpoint_source=checkpoint_source)
    for check in checks:
        print(check.line(), flush=True)
    return 1 if doctor.failed(checks) else 0


def _failed(counts: dict[str, int]) -> str:
    return f"; {counts['failed']} failed (see the log)" if counts["failed"] else ""


def _cluster(action: str, *, as_json: bool) -> int:
    if action == "start":
        started = cluster.start()
        print(f"Embedded Ray cluster running at {started.address} (Ray Client: {started.client_address})")
        if started.dashboard_url:
            print(f"Dashboard: {started.dashboard_url}")
        return 0
    if action == "stop":
        print(
            "Stopped the embedded Ray cluster."
            if cluster.stop()
            else "The embedded Ray cluster is not running."
        )
        return 0
    local = cluster.current()
    if local is None:
        print("The embedded Ray cluster is not running.")
        return 1
    info = {**cluster.status(local), "client_address": local.client_address, "dashboard": local.dashboard_url}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    used, capacity = info["object_store_used_bytes"], info["object_store_capacity_bytes"]
    print(f"address:       {info['address']}")
    print(f"ray client:    {info['client_address']}")
    print(f"dashboard:     {info['dashboard'] or 'off'}")
    print(f"nodes:         {info['nodes']}")
    print(f"resources:     {_resources(info['resources'])}")
    print(
        f"object store:  {used / 2**20:.1f} MiB used of {capacity / 2**20:.0f} MiB, "
        f"{info['object_store_num_objects']} objects"
    )
    return 0


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v / 2**30:.1f} GiB" if k in ("memory", "object_store_memory") else f"{k}={v:g}"
        for k, v in sorted(resources.items())
        if not k.startswith("node:")
    )


if __name__ == "__main__":
    sys.exit(main())

"""A multi-node Ray cluster on one machine, for rehearsing cluster behaviour (and for the tests).

    python scripts/local_cluster.py start [--nodes 1] [--head-cpus 1] [--node-cpus 2]
    python scripts/local_cluster.py add-node [--cpus 2]       # prints the new node's index
    python scripts/local_cluster.py kill-node INDEX           # SIGKILL: a node lost, not drained
    python scripts/local_cluster.py status
    python scripts/local_cluster.py stop

Every node is a real `ray start` (the head with `--head`, the others with `--address=...`), all on
127.0.0.1 with their own ports, so Ray schedules, fails over and resizes exactly as on a cluster.
Each node gets an explicit `--object-store-memory` and `--memory` (by default a node reserves
30 % of the machine's RAM for its object store, which several nodes on one machine cannot all
have). Worker nodes carry the custom resource `{"local_node_<i>": 1}` so tests can pin work to one.
Each worker node gets its own `--temp-dir`: nodes that share a session directory share its
`runtime_resources/`, and a joining node re-unpacks a job's working_dir there (rmtree + unzip),
which pulls the directory out from under the other nodes' running workers (their cwd is gone, and
the next `os.getcwd()` in them fails). On a real cluster every node has its own disk.

Jobs: `RAY_ADDRESS=http://127.0.0.1:8266 ray job submit --working-dir . -- python jobs/gppf_r50.py`.
The cluster always uses Ray's token authentication (Ray >= 2.59): the script creates
`~/.ray/auth_token` if it is missing and starts every node with RAY_AUTH_MODE=token; clients on
this machine then export RAY_AUTH_MODE=token too.
`stop` kills only this cluster's processes (found by its session name), not another Ray on the
machine, and removes the worker nodes' temp dirs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("GPPF_LOCAL_CLUSTER_STATE", "~/.cache/gppf/local_cluster.json")).expanduser()
BASE_NODE_PORT = 21000  # worker node i uses BASE_NODE_PORT + 20 * i + (0..7)


def _ray() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def _env() -> dict[str, str]:
    # The nodes (and so `python` in a submitted job's entrypoint) use this script's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=path)
    subprocess.run([_ray(), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def _load() -> dict:
    if not STATE.exists():
        raise SystemExit(f"no local cluster recorded in {STATE}: run `start` first")
    return json.loads(STATE.read_text())


def _save(state: dict) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=2))


def _run(cmd: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")


def _node_ports(index: int) -> dict[str, int]:
    base = BASE_NODE_PORT + 20 * index
    return {
        "node-manager-port": base,
        "object-manager-port": base + 1,
        "dashboard-agent-listen-port": base + 2,
        "dashboard-agent-grpc-port": base + 3,
        "metrics-export-port": base + 4,
        "runtime-env-agent-port": base + 5,
        "min-worker-port": 30000 + 200 * index,  # worker processes: 150 ports per node
        "max-worker-port": 30000 + 200 * index + 150,
    }


def start(args: argparse.Namespace) -> dict:
    if STATE.exists():  # starting over it would lose the record `stop` needs to find its processes
        raise SystemExit(f"a local cluster is already recorded in {STATE}: run `stop` first")
    env = _env()
    state = {
        "port": args.port,
        "dashboard_port": args.dashboard_port,
        "object_store_mb": args.object_store_mb,
        "memory_mb": args.memory_mb,
        "nodes": [],
    }
    ports = _node_ports(99)
    _run(
        [
            _ray(),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={args.port}",
            f"--num-cpus={args.head_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={args.object_store_mb * 2**20}",
            f"--memory={args.memory_mb * 2**20}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={args.dashboard_port}",
            "--resources",
            json.dumps({"local_head": 1}),
            *[f"--{k}={v}" for k, v in ports.items()],
        ],
        env,
    )
    gcs = [cmd for _, _, cmd in _ps() if f"--gcs_server_port={args.port}" in cmd]
    if not gcs or "--log_dir=" not in gcs[0]:
        raise SystemExit(f"the head started, but no GCS process with port {args.port} was found")
    state["session_dir"] = gcs[0].split("--log_dir=")[1].split()[0].rsplit("/logs", 1)[0]
    _save(state)
    for _ in range(args.nodes):
        add_node(argparse.Namespace(cpus=args.node_cpus, resources="{}"), state)
    return state


def add_node(args: argparse.Namespace, state: dict | None = None) -> int:
    state = state or _load()
    env = _env()
    index = len(state["nodes"])
    resources = {**json.loads(args.resources), f"local_node_{index}": 1}
    ports = _node_ports(index)
    # Short: Ray's Unix socket paths live under it (108-byte limit).
    temp_dir = Path(state["session_dir"]).parent.parent / f"gppf-node{index}-{state['port']}"
    _run(
        [
            _ray(),
            "start",
            f"--address=127.0.0.1:{state['port']}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={args.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={state['object_store_mb'] * 2**20}",
            f"--memory={state['memory_mb'] * 2**20}",
            f"--temp-dir={temp_dir}",
            "--resources",
            json.dumps(resources),
            *[f"--{k}={v}" for k, v in ports.items()],
        ],
        env,
    )
    state["nodes"].append(
        {
            "index": index,
            "node_manager_port": ports["node-manager-port"],
            "cpus": args.cpus,
            "temp_dir": str(temp_dir),
        }
    )
    _save(state)
    print(index, flush=True)
    return index


def _ps() -> list[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process (`ps` works on Linux and macOS)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, *cmd = line.split(None, 2)
        rows.append((int(pid), int(ppid), cmd[0] if cmd else ""))
    return rows


def _trees(*needles: str) -> list[int]:
    """Processes whose command line contains a needle, with all their descendants (Ray's workers
    rename themselves, e.g. "ray::RayTrainWorker", but stay children of their node's raylet)."""
    rows = _ps()
    found = {pid for pid, _, cmd in rows if pid != os.getpid() and any(n in cmd for n in needles)}
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(ppid, []).append(pid)
    todo, out = list(found), set()
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(out)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_node(index: int) -> list[int]:
    state = _load()
    node = next((n for n in state["nodes"] if n["index"] == index), None)
    if node is None:
        raise SystemExit(f"no worker node {index}; nodes: {[n['index'] for n in state['nodes']]}")
    # The node's raylet (and with it its agents and workers): what a machine failure looks like.
    pids = _trees(f"--node_manager_port={node['node_manager_port']}")
    _kill(pids)
    node["killed"] = True
    _save(state)
    print(f"killed worker node {index}: {len(pids)} processes", flush=True)
    return pids


def stop() -> None:
    state = _load()
    # Every process of this cluster names its session (under the head's or its node's temp dir),
    # or descends from one that does.
    session = Path(state["session_dir"]).name
    for _ in range(3):
        pids = _trees(session)
        if not pids:
            break
        _kill(pids)
        time.sleep(1)
    # `ray start --head` records the cluster for ray.init() to join; `ray stop` would remove the
    # record, and a stale one makes every later ray.init() try to join a dead cluster.
    record = Path(state["session_dir"]).parent / "ray_current_cluster"
    if record.exists() and record.read_text().strip().endswith(f":{state['port']}"):
        record.unlink()
    for node in state["nodes"]:
        if node.get("temp_dir"):
            shutil.rmtree(node["temp_dir"], ignore_errors=True)
    STATE.unlink(missing_ok=True)
    print("local cluster stopped", flush=True)


def status() -> None:
    state = _load()
    env = dict(os.environ, RAY_AUTH_MODE="token")
    subprocess.run([_ray(), "status", f"--address=127.0.0.1:{state['port']}"], env=env, check=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the head and --nodes worker nodes")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--head-cpus", type=int, default=1)
    s.add_argument("--node-cpus", type=int, default=2)
    s.add_argument("--port", type=int, default=6380, help="GCS port of the head")
    s.add_argument("--dashboard-port", type=int, default=8266)
    s.add_argument("--object-store-mb", type=int, default=512, help="per node")
    s.add_argument("--memory-mb", type=int, default=4096, help="per node, for Ray's scheduling")
    a = sub.add_parser("add-node", help="add a worker node")
    a.add_argument("--cpus", type=int, default=2)
    a.add_argument("--resources", default="{}", help="extra custom resources, JSON")
    k = sub.add_parser("kill-node", help="SIGKILL every process of a worker node")
    k.add_argument("index", type=int)
    sub.add_parser("status")
    sub.add_parser("stop")
    args = ap.parse_args(argv)
    if args.cmd == "start":
        start(args)
        print(f"dashboard and job API: http://127.0.0.1:{args.dashboard_port} (export RAY_AUTH_MODE=token)")
    elif args.cmd == "add-node":
        add_node(args)
    elif args.cmd == "kill-node":
        kill_node(args.index)
    elif args.cmd == "status":
        status()
    else:
        stop()


if __name__ == "__main__":
    main()

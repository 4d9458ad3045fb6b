"""A Ray cluster of several nodes on one machine, for tests and benchmarks that lose a node.

Each node is its own ``ray start --block`` process (its own raylet, object store, workers and temp
dir), the head included, so killing one node's processes is what a machine that vanishes does to
the cluster: its actors, tasks and the objects in its store are gone; the head and the other nodes
live on. Nothing here stops Ray processes by name (``ray stop`` would end every cluster on the
machine): a node is the process tree of its ``ray start``, plus any process that names the node's
own temp dir on its command line (workers that setsid away from the tree).

::

    with LocalRayCluster(head_cpus=1) as cluster:
        doomed = cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes(3)
        ...
        cluster.kill(doomed)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
"""The environment of every node and driver: a throwaway loopback cluster needs no auth token (the
default ``ray start --head`` turns token auth on, and a driver without the token is refused)."""


@dataclass(slots=True)
class RayNode:
    """One node: its ``ray start --block`` process and its temp dir."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    resources: dict[str, float] = field(default_factory=dict)

    def pids(self) -> set[int]:
        """Every live process of this node (see the module docstring)."""
        return processes_of(self.process.pid, str(self.temp_dir) + "/")


class LocalRayCluster:
    """A head node and worker nodes on this machine, each a separate raylet.

    Args:
        head_cpus: Logical CPUs of the head (where the driver connects; 0 keeps work off it).
        head_gpus: GPUs of the head.
        object_store_bytes: Object store of each node.
        env: Extra environment of every node (``CUDA_VISIBLE_DEVICES`` goes per node in ``add_node``).
    """

    def __init__(self, head_cpus: float = 1, head_gpus: int = 0, object_store_bytes: int = 300_000_000,
                 env: dict[str, str] | None = None) -> None:
        # A short root: Ray's unix sockets live under it and must stay under 107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
        self.object_store_bytes = object_store_bytes
        self.env = {**os.environ, **RAY_ENV, **(env or {})}
        self.nodes: list[RayNode] = []
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        try:
            self.head = self._start("head", ["--head", "--port", str(port), "--include-dashboard", "false",
                                             "--dashboard-port", str(_free_port())], head_cpus, head_gpus, None)
        except BaseException:
            self.shutdown()
            raise

    def add_node(self, num_cpus: float, num_gpus: int = 0, cuda_visible_devices: str | None = None,
                 resources: dict[str, float] | None = None) -> RayNode:
        """Starts a worker node that joins the head; returns at once (see ``wait_for_nodes``)."""
        args = ["--address", self.address]
        if resources:
            import json

            args += ["--resources", json.dumps(resources)]
        node = self._start(f"worker{len(self.nodes)}", args, num_cpus, num_gpus, cuda_visible_devices)
        node.resources = dict(resources or {})
        return node

    def _start(self, name: str, args: list[str], num_cpus: float, num_gpus: int, gpus: str | None) -> RayNode:
        temp_dir = self.root / name
        env = dict(self.env)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        cmd = ["ray", "start", "--block", "--disable-usage-stats", "--temp-dir", str(temp_dir),
               "--num-cpus", f"{num_cpus:g}", "--num-gpus", str(num_gpus),
               "--object-store-memory", str(self.object_store_bytes), *args]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - the node's lifetime, closed by the process
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        node = RayNode(name, process, temp_dir)
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Returns once ``count`` nodes are alive in the cluster (the head counts)."""
        import ray

        deadline = time.time() + timeout_s
        connected_here = not ray.is_initialized()
        if connected_here:
            self.connect()
        try:
            while len([n for n in ray.nodes() if n["Alive"]]) < count:
                for node in self.nodes:
                    if node.process.poll() is not None:
                        raise RuntimeError(f"ray node {node.name} exited: {self.log(node)[-2000:]}")
                if time.time() > deadline:
                    raise TimeoutError(f"{count} Ray nodes not alive after {timeout_s:.0f} s")
                time.sleep(0.25)
        finally:
            if connected_here:
                ray.shutdown()

    def connect(self, timeout_s: float = 120.0) -> None:
        """Connects this process as a driver (retrying while the head starts)."""
        import ray

        os.environ.update(RAY_ENV)
        deadline = time.time() + timeout_s
        while True:
            if self.head.process.poll() is not None:
                raise RuntimeError(f"the Ray head exited: {self.log(self.head)[-2000:]}")
            try:
                ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
                return
            except (ConnectionError, RuntimeError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self, node: RayNode) -> int:
        """SIGKILLs every process of ``node`` (a machine lost); returns how many were killed."""
        killed: set[int] = set()
        for _ in range(20):  # again, for workers the raylet spawned while dying
            pids = node.pids() - killed
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        node.process.wait(timeout=10)
        return len(killed)

    def node_running(self, text: str) -> RayNode | None:
        """The first worker node with a process whose command line (Ray's process title) holds
        ``text``: ``"EncoderActor"`` finds a node that hosts an encoder actor now."""
        for node in self.nodes[1:]:
            if node.process.poll() is None and any(text in _cmdline(pid) for pid in node.pids()):
                return node
        return None

    def log(self, node: RayNode) -> str:
        path = self.root / f"{node.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def shutdown(self) -> None:
        """Kills every node (workers first, the head last) and removes the temp dirs."""
        for node in reversed(self.nodes):
            if node.process.poll() is None or node.pids():
                self.kill(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def processes_of(root_pid: int, marker: str | None = None) -> set[int]:
    """``root_pid`` and its live descendants, and every process whose command line holds ``marker``."""
    children: dict[int, list[int]] = {}
    named: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue  # a zombie: dead already, reaped by its parent
        children.setdefault(int(fields[1]), []).append(int(entry))
        if marker is not None and marker in cmdline:
            named.add(int(entry))
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    alive = {pid for pid in found if os.path.exists(f"/proc/{pid}")}
    if root_pid in alive and _is_zombie(root_pid):
        alive.discard(root_pid)
    return alive | named


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

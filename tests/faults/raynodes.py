"""A real two-node Ray cluster on this machine for node-loss tests: a head (`ray start --head`) and worker nodes
(`ray start --address`), each with ports of its own; a node is lost by SIGKILL of its raylet and every process of
it. Only this cluster's processes are ever signalled (the session's other Ray clusters live on)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from servers import BIN, free_ports


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return env


class RayNode:
    """One `ray start` node, found again by its own node-manager port (in its raylet's command line)."""

    def __init__(self, address: str | None, num_cpus: int, resources: dict | None = None,
                 temp_dir: str | None = None):
        ports = free_ports(8)
        self.node_port = ports[0]
        args = ["--num-cpus", str(num_cpus), "--node-manager-port", str(ports[0]), "--object-manager-port",
                str(ports[1]), "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port",
                str(ports[3]), "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
                "--disable-usage-stats"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        if address is None:  # the head: GCS, client server and dashboard on ports of their own, our temp dir
            (self.gcs_port,) = free_ports(1)
            args = ["--head", "--port", str(self.gcs_port), "--ray-client-server-port", str(ports[6]),
                    "--dashboard-port", str(ports[7]), "--include-dashboard", "false", "--temp-dir", temp_dir, *args]
        else:
            args = ["--address", address, *args]
        # a session of its own: the node's daemons share its process group, which `kill` signals (never ours)
        out = subprocess.run([str(BIN / "ray"), "start", *args], env=ray_env(), capture_output=True, text=True,
                             timeout=300, check=False, start_new_session=True)
        self.raylet_pid = None
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        self.raylet_pid = self._find_raylet().pid

    def _find_raylet(self) -> psutil.Process:
        flag = f"--node_manager_port={self.node_port}"
        for p in psutil.process_iter(["cmdline"]):
            if flag in (p.info["cmdline"] or []):
                return p
        raise AssertionError(f"no raylet with {flag}")

    def processes(self) -> list[psutil.Process]:
        """The raylet, its workers (each in a session of its own) and the rest of its `ray start` group."""
        try:
            raylet = psutil.Process(self.raylet_pid)
            procs = [raylet, *raylet.children(recursive=True)]
            group = os.getpgid(self.raylet_pid)
            assert group != os.getpgrp(), "the node shares our process group"
        except (psutil.NoSuchProcess, ProcessLookupError):
            return []
        for p in psutil.process_iter():
            try:
                if p not in procs and os.getpgid(p.pid) == group:
                    procs.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return procs

    def executing(self, title: str) -> psutil.Process | None:
        """The worker of this node whose process title is `ray::<title>` (Ray's title while it runs that call)."""
        for p in self.processes():
            try:
                if " ".join(p.cmdline()).startswith(f"ray::{title}"):
                    return p
            except psutil.NoSuchProcess:
                pass
        return None

    def kill(self) -> int:
        """Lose the node: SIGKILL its raylet and every process of it at once. Returns how many were signalled."""
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return len(procs)


class RayCluster:
    """A head with `head_cpus` CPUs; `add_node` joins a worker node. `stop` kills every process of both."""

    def __init__(self, head_cpus: int):
        # short: Ray's socket paths under it must stay below the 107-byte limit of a Unix socket name
        self.temp_dir = tempfile.mkdtemp(prefix="i2lray")
        self.nodes: list[RayNode] = []
        self.head = RayNode(None, head_cpus, temp_dir=self.temp_dir)
        self.nodes.append(self.head)
        self.address = f"127.0.0.1:{self.head.gcs_port}"

    def add_node(self, num_cpus: int, resources: dict | None = None) -> RayNode:
        node = RayNode(self.address, num_cpus, resources)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        # anything of ours the raylets did not own (found by our temp dir or GCS port on its command line)
        mark = (self.temp_dir, f":{self.head.gcs_port}")
        left = []
        for p in psutil.process_iter(["cmdline"]):
            if any(m in " ".join(p.info["cmdline"] or []) for m in mark):
                left += [p, *p.children(recursive=True)]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=30)


def wait_for(what, proc: subprocess.Popen, log: Path, timeout_s: float = 300, poll_s: float = 0.01):
    """Poll what() until it returns something truthy; fail with the log if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got:
            return got
        assert proc.poll() is None, f"exited ({proc.returncode}) first: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out: {log.read_text()[-3000:]}"
        time.sleep(poll_s)

"""A two-node Ray cluster on this machine, started the way a user starts one (``ray start``), for
``ray job submit`` tests: a head and one more node, 1 CPU each, every port and temp dir their own,
so the cluster lives beside any other Ray on the machine. Each node is a ``ray start --block``
process in its own session; teardown ends those sessions (never a machine-wide ``ray stop``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Uploaded with every job: the checkout minus the environment, data and outputs (.gitignore too).
RUNTIME_ENV = {"excludes": [".venv", "data", "out", ".git", "*.lance"]}


def _free_ports(k: int) -> list[int]:
    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_DEDUP_LOGS="0",
                        RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                        # The dashboard gets 60 s to start (its modules 30 s); a loaded machine needs more.
                        RAY_DASHBOARD_STARTUP_TIMEOUT_S="300", RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="240",
                        # Ray Train's controller polls its workers every 2 s by default (a kill, the end
                        # of a run are seen up to 2 s late); jobs inherit the nodes' environment.
                        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
        self.env.pop("RAY_ADDRESS", None)

    def _node_args(self, name: str, worker_base: int) -> list[str]:
        nm, om, agent, grpc, rtenv, metrics = _free_ports(6)
        return ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--node-manager-port", str(nm),
                "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
                "--dashboard-agent-grpc-port", str(grpc), "--runtime-env-agent-port", str(rtenv),
                "--metrics-export-port", str(metrics), "--min-worker-port", str(worker_base),
                "--max-worker-port", str(worker_base + 99), "--temp-dir", str(self.root / name),
                "--object-store-memory", str(200 * 2**20), "--disable-usage-stats", "--block"]

    def _start(self, args: list[str], log: str) -> None:
        out = open(self.root / log, "w")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True, cwd=self.root))

    def start(self) -> None:
        self.gcs_port, self.dash_port, client = _free_ports(3)
        base = 20000 + (os.getpid() % 200) * 200  # two 100-port worker ranges of our own
        self._start(["--head", "--port", str(self.gcs_port), "--dashboard-port", str(self.dash_port),
                     "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                     "--ray-client-server-port", str(client), *self._node_args("head", base)], "head.log")
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self._wait(1)
        self._start(["--address", f"127.0.0.1:{self.gcs_port}", *self._node_args("node2", base + 100)], "node2.log")
        self.node_ids = self._wait(2)

    def _wait(self, n: int, timeout: float = 240) -> list[str]:
        from ray.util.state import list_nodes

        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray start exited: {self.logs()}")
            try:
                alive = [nd.node_id for nd in list_nodes(address=self.address, timeout=10) if nd.state == "ALIVE"]
                if len(alive) >= n:
                    return alive
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                pass
            time.sleep(2)
        raise RuntimeError(f"cluster did not reach {n} nodes in {timeout}s: {self.logs()}")

    def submit(self, *entrypoint: str, timeout: float = 480, runtime_env: dict | None = None,
               submission_id: str | None = None) -> tuple[str, subprocess.CompletedProcess]:
        """``ray job submit --working-dir . -- <entrypoint>`` as the README says; returns
        (submission id, the CLI's completed process). Give ``submission_id`` to watch the job
        (``job``) while this call waits in another thread."""
        sub_id = submission_id or f"t{time.time_ns()}"
        env = {**RUNTIME_ENV, **(runtime_env or {})}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.address, "--submission-id", sub_id,
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(env), "--", *entrypoint]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        return sub_id, r

    def job(self, sub_id: str):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).get_job_info(sub_id)

    def task_nodes(self, job_id: str, name_contains: str) -> dict[str, int]:
        """node id -> finished tasks of this job whose name contains ``name_contains`` (state API)."""
        from ray.util.state import list_tasks

        tasks = list_tasks(address=self.address, filters=[("job_id", "=", job_id)], limit=10000,
                           detail=True, raise_on_missing_output=False, timeout=60)
        out: dict[str, int] = {}
        for t in tasks:
            if name_contains in t.name and t.state == "FINISHED" and t.node_id:
                out[t.node_id] = out.get(t.node_id, 0) + 1
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + wait
            while time.time() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.5)
        # Ray daemons that left the node's process group (setsid) are found by their temp dir.
        for name in ("head", "node2"):
            d = str(self.root / name)
            for pid in _pids_mentioning(d):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


@pytest.fixture(scope="session")
def cluster():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip(f"no ray CLI in {BIN}")
    # Ray gives a raylet 30 s (not configurable) to register with the GCS; on an overloaded machine
    # that can fail, so a fresh cluster (new ports, new temp dir) is tried up to three times.
    errors = []
    for _ in range(3):
        root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths are length-limited
        c = Cluster(root)
        try:
            c.start()
        except RuntimeError as e:
            errors.append(str(e)[-1500:])
            c.stop()
            shutil.rmtree(root, ignore_errors=True)
            continue
        try:
            yield c
        finally:
            c.stop()
            shutil.rmtree(root, ignore_errors=True)
        return
    raise RuntimeError("could not start a two-node cluster:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    from curation import samples

    root = tmp_path_factory.mktemp("samples") / "images"
    return root, samples.write_sample_folder(root)


@pytest.fixture(scope="session")
def sample_config(tmp_path_factory) -> Path:
    """Stage-1 config with the locally trained tokenizer (CLIP and NSFW are skipped in these jobs)."""
    import yaml

    from curation import samples

    d = tmp_path_factory.mktemp("cfg")
    path = d / "stage1.yaml"
    path.write_text(yaml.safe_dump({"batch_size": 4,
                                    "scoring": {"tokenizer": samples.make_tiny_tokenizer(d / "tokenizer")},
                                    "thresholds": {"token_length": {"max_tokens": 512}}}))
    return path

"""A real Prometheus server for tests (the Debian `prometheus` package, which `.ci/run`
installs): a config derived from deploy/compose/observability/prometheus.yml with the
mesh's metrics addresses as targets, a temporary storage directory, a loopback port
chosen by binding port 0 first, and the process stopped by its PID."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from services.common.procs import REPO_ROOT

DEPLOY_CONFIG = REPO_ROOT / "deploy/compose/observability/prometheus.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(targets: dict[str, list[str]], scrape_interval_s: float) -> dict:
    """The deployment's scrape config with `targets` (job name -> host:port list) in
    place of its compose service names, and a test's scrape interval."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{round(scrape_interval_s * 1000)}ms"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), f"deploy jobs {sorted(jobs)} vs {sorted(targets)}"
    for name, job in jobs.items():
        job.pop("dns_sd_configs", None)  # compose finds the workers by DNS
        job["static_configs"] = [{"targets": list(targets[name])}]
    return config


class PrometheusServer:
    def __init__(self, work_dir: Path, targets: dict[str, list[str]], scrape_interval_s=1.0):
        self.binary = shutil.which("prometheus")
        assert self.binary, "prometheus is not installed (.ci/run installs the Debian package)"
        self.work_dir = work_dir
        self.config_path = work_dir / "prometheus.yml"
        self.config_path.write_text(json.dumps(scrape_config(targets, scrape_interval_s)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work_dir / "prometheus.log"
        self.popen: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.work_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout_s}s")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it does not exit."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

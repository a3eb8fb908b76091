"""The command line against real processes: generate/status, and `up` leaving nothing behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import httpx

from bench._otlp_receiver import OtlpReceiver
from gateway.client import Client
from services.cli.main import main
from services.common.procs import REPO_ROOT
from tests.integration.conftest import reference_tokens, wait_until


def test_generate_and_status_through_the_mesh(mesh, reference_engine, capsys):
    code = main(["generate", "--gateway", mesh.gateway_address, "--prompt-ids", "1,2,3", "--max-tokens", "4", "--seed", "3", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    [expected] = reference_tokens(reference_engine, [([1, 2, 3], {"max_tokens": 4, "seed": 3})])
    assert (result["token_ids"], result["finish_reason"], result["seed"]) == (expected, "length", 3)

    assert main(["generate", "--gateway", mesh.gateway_address, "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids='1,x' must be comma-separated ints" in capsys.readouterr().err

    assert main(["status", "--scheduler", mesh.scheduler_address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted(i["instance_id"] for i in status["instances"]) == sorted(
        w.name for w in mesh.live_workers()
    )
    assert status["dispatch_policy"] == "freest"
    assert (status["migration_policy"], status["autoscale"]) == ("freeness", False)


def test_drain_and_undo_through_the_cli(mesh, capsys):
    name = mesh.live_workers()[-1].name
    assert main(["drain", name, "--scheduler", mesh.scheduler_address, "--wait", "--timeout", "30"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"{name}: draining" in out and f"{name}: drained (nothing running or waiting)" in out
    assert main(["status", "--scheduler", mesh.scheduler_address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {i["instance_id"]: i["is_terminating"] for i in status["instances"]}[name] is True
    assert main(["drain", name, "--undo", "--scheduler", mesh.scheduler_address]) == 0
    assert f"{name}: no longer draining" in capsys.readouterr().out

    def undone():
        main(["status", "--scheduler", mesh.scheduler_address, "--json"])
        instances = json.loads(capsys.readouterr().out)["instances"]
        return not any(i["is_terminating"] for i in instances)

    wait_until(undone, 20, 0.1, "the drain to be lifted")
    assert main(["drain", "nope", "--scheduler", mesh.scheduler_address]) == 2
    assert "NOT_FOUND: instance 'nope' is not registered" in capsys.readouterr().err


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_up_serves_and_sigterm_stops_every_process(tmp_path):
    """Also: `--otlp-endpoint` sends every service's traces there, and the banner says
    where each service's metrics are."""
    receiver = OtlpReceiver().start()
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--workers", "1", "--gateway-port", "0",
         "--http-port", "0", "--scheduler-port", "0", "--no-table", "--log-dir", str(tmp_path),
         "--otlp-endpoint", receiver.endpoint],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        lines = _lines(up.stdout)
        output = []
        while not any("llmesh is up" in line for line in output):
            line = lines.get(timeout=180)
            assert line is not None, "".join(output)
            output.append(line)
        while "try:" not in output[-1]:
            output.append(lines.get(timeout=10))
        gateway = re.search(r"llmesh is up: gateway (\S+)", "".join(output)).group(1)
        assert "./llmesh generate --gateway" in "".join(output)
        assert f"traces:  OTLP to {receiver.endpoint}" in "".join(output)
        assert "internal authentication on (cluster secret: $LLMESH_CLUSTER_SECRET)" in "".join(output)  # fmt: skip
        assert "client authentication: off (any client may call the gateway" in "".join(output)
        metrics = dict(re.findall(r"(\S+)=(http://\S+/metrics)", "".join(output)))
        assert sorted(metrics) == ["gateway", "scheduler", "worker-0"]
        with Client(gateway, timeout_s=60) as client:
            reply = client.generate(prompt_token_ids=[1, 2], max_tokens=3, request_id="up-traced")
            assert len(reply.token_ids) == 3
        with urllib.request.urlopen(metrics["gateway"], timeout=10) as page:
            assert (
                'llmesh:request_success_total{finished_reason="length",model_name="tiny"} 1.0'
                in page.read().decode()
            )
        with urllib.request.urlopen(metrics["worker-0"], timeout=10) as page:
            assert (
                'llmesh:num_requests_running{instance_id="worker-0",model_name="tiny"}'
                in page.read().decode()
            )
        wait_until(
            lambda: (
                {
                    (s.service, s.name)
                    for s in receiver.snapshot()
                    if s.attributes.get("llmesh.request_id") == "up-traced"
                }
                >= {("llmesh-gateway", "gateway.generate"), ("llmesh-worker", "worker.request")}
            ),
            timeout_s=30,
            what="the request's spans at the OTLP receiver",
        )
        while not any("OpenAI API:" in line for line in output):
            output.append(lines.get(timeout=10))
        base_url = re.search(r"OpenAI API: (\S+)", "".join(output)).group(1)
        reply = httpx.post(
            f"{base_url}/completions",
            json={"model": "tiny", "prompt": [1, 2], "max_tokens": 3, "temperature": 0},
            timeout=60,
        )
        assert reply.json()["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 3,
            "total_tokens": 5,
        }
        # The HTTP request went through the same request path: the gateway's metrics
        # (also on the HTTP port's /metrics) count both.
        page = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
        assert (
            'llmesh:request_success_total{finished_reason="length",model_name="tiny"} 2.0' in page
        )
        children = [json.loads(p.read_text())["pid"] for p in tmp_path.glob("*.ready.json")]
        assert len(children) == 3  # scheduler, worker, gateway

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        receiver.stop()
    for pid in children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"child process {pid} outlived `llmesh up`")

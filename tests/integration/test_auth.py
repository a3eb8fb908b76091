"""Authentication against live processes (docs/security.md).

Internal: every method of every service, enumerated through server reflection, answers
UNAUTHENTICATED without cluster credentials and with a wrong secret; health stays open;
cluster mTLS refuses a plaintext client and a certificate from another CA. Edge: a
gateway with API keys and TLS (next to the shared mesh's, same scheduler) refuses a
missing or wrong key over gRPC and HTTP (the official openai client raises
AuthenticationError) without the request reaching a worker, serves a right key with
exactly the shared mesh's tokens, and a plaintext client cannot talk to its TLS ports.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid

import grpc
import httpx
import openai
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gateway.client import Client, GatewayError
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common import cluster_auth
from services.common.auth_interceptors import OPEN_SERVICES, SyncMetadata, cluster_signature
from services.common.cluster_tls import make_certs
from services.common.procs import start_service, stop_all
from tests.integration.conftest import log_events, worker_load

TIMEOUT_S = 60.0
API_KEY = "sk-llmesh-test-" + "k" * 24
WRONG_SECRET = b"w" * 32


def _methods(address: str, credentials=None) -> dict[str, tuple[bool, bool]]:
    """/Service/Method -> (client streaming, server streaming), from server reflection."""
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        methods = {}
        for service_name in database.get_services():
            service = pool.FindServiceByName(service_name)
            for method in service.methods:
                methods[f"/{service_name}/{method.name}"] = (
                    method.client_streaming,
                    method.server_streaming,
                )
    return methods


def _call_empty(
    channel: grpc.Channel, method: str, streaming: tuple[bool, bool]
) -> grpc.StatusCode:
    """Call `method` with one empty message (b"") and no more; its status code."""
    client_streaming, server_streaming = streaming
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[streaming]
    call = kind(method)
    request = iter([b""]) if client_streaming else b""
    try:
        reply = call(request, timeout=10)
        if server_streaming:
            list(reply)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _internal_services(mesh) -> dict[str, str]:
    return {
        "scheduler": mesh.scheduler_address,
        "worker": mesh.live_workers()[0].address,
        "gateway": mesh.gateway_address,
    }


def test_every_internal_rpc_refuses_callers_without_the_cluster_secret(mesh):
    refused: dict[str, set] = {}
    for name, address in _internal_services(mesh).items():
        methods = _methods(address)
        internal = {
            m: s
            for m, s in methods.items()
            if m.lstrip("/").split("/")[0] not in (*OPEN_SERVICES, "llmesh.v1.Gateway")
        }
        assert internal, f"{name}: reflection listed no internal method"
        with grpc.insecure_channel(address) as bare:
            outsider = {m: _call_empty(bare, m, s) for m, s in internal.items()}
        wrong = grpc.intercept_channel(
            grpc.insecure_channel(address), SyncMetadata(cluster_signature(WRONG_SECRET))
        )
        with wrong:
            impostor = {m: _call_empty(wrong, m, s) for m, s in internal.items()}
        refused[name] = set(internal)
        assert outsider == dict.fromkeys(internal, grpc.StatusCode.UNAUTHENTICATED), name
        assert impostor == dict.fromkeys(internal, grpc.StatusCode.UNAUTHENTICATED), name
        with grpc.insecure_channel(address) as bare:  # health stays open
            reply = health_pb2_grpc.HealthStub(bare).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The migration handshakes, KunServe and admin calls are among them.
    assert {
        "/llmesh.v1.Worker/Submit",
        "/llmesh.v1.Worker/PrepareMigration",
        "/llmesh.v1.Worker/MigrationStage",
        "/llmesh.v1.Worker/CommitMigration",
        "/llmesh.v1.Worker/AbortMigration",
        "/llmesh.v1.Worker/FormGroup",
        "/llmesh.v1.Worker/Exchange",
    } <= refused["worker"]
    assert {
        "/llmesh.v1.Scheduler/Migrate",
        "/llmesh.v1.Scheduler/Drain",
        "/llmesh.v1.Scheduler/DropGroup",
        "/llmesh.v1.Scheduler/RestoreGroup",
        "/llmesh.v1.Scheduler/RegisterInstance",
        "/llmesh.v1.Scheduler/StreamLoad",
    } <= refused["scheduler"]
    assert "/llmesh.v1.OutputSink/PushOutputs" in refused["gateway"]
    # A member (this process holds the suite's secret) is served.
    from services.common.grpc_client import cluster_channel

    with cluster_channel(mesh.scheduler_address) as channel:
        state = scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=5
        )
    assert len(state.instances) == len(mesh.live_workers())


def test_a_service_without_a_cluster_secret_refuses_to_start(tmp_path):
    missing = tmp_path / "no-such-secret"
    proc = start_service(
        "scheduler",
        ["--bind", "127.0.0.1:0"],
        log_dir=tmp_path,
        env={"LLMESH_CLUSTER_SECRET": "", "LLMESH_CLUSTER_SECRET_FILE": str(missing)},
    )
    assert proc.popen.wait(timeout=60) == 2
    assert f"no cluster secret: set LLMESH_CLUSTER_SECRET, or put one in {missing}" in (
        proc.log_tail()
    )


# -- cluster mTLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_scheduler(tmp_path_factory):
    """A scheduler whose port is mTLS with a cluster CA; (address, certs dir)."""
    certs = tmp_path_factory.mktemp("cluster-certs")
    make_certs(certs, ["127.0.0.1"])
    proc = start_service(
        "scheduler",
        ["--bind", "127.0.0.1:0", "--cluster-tls-dir", str(certs)],
        log_dir=tmp_path_factory.mktemp("tls-scheduler"),
    )
    try:
        proc.wait_ready(TIMEOUT_S)
        yield proc.address, certs
    finally:
        stop_all([proc])


def _credentials(ca_dir, cert_dir, role="operator") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (ca_dir / "ca.pem").read_bytes(),
        (cert_dir / f"{role}-key.pem").read_bytes(),
        (cert_dir / f"{role}.pem").read_bytes(),
    )


def _cluster_state(channel) -> grpc.StatusCode:
    try:
        scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=10
        )
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_cluster_mtls_needs_a_certificate_of_the_cluster_ca(tls_scheduler, tmp_path):
    address, certs = tls_scheduler
    signature = SyncMetadata(cluster_signature(cluster_auth.current().secret))
    member = grpc.intercept_channel(
        grpc.secure_channel(address, _credentials(certs, certs)), signature
    )
    with member:
        assert _cluster_state(member) == grpc.StatusCode.OK
        # Through reflection over mTLS too: the internal methods still need the secret.
        methods = _methods(address, _credentials(certs, certs))
    with grpc.secure_channel(address, _credentials(certs, certs)) as unsigned:
        assert _call_empty(unsigned, "/llmesh.v1.Scheduler/Drain", methods["/llmesh.v1.Scheduler/Drain"]) == grpc.StatusCode.UNAUTHENTICATED  # fmt: skip
        reply = health_pb2_grpc.HealthStub(unsigned).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    rogue = tmp_path / "rogue"
    make_certs(rogue, ["127.0.0.1"])  # same names, another CA
    # The rogue client trusts the real CA, but presents a certificate the cluster never signed.
    foreign = grpc.intercept_channel(
        grpc.secure_channel(address, _credentials(certs, rogue)), signature
    )
    with foreign:
        assert _cluster_state(foreign) == grpc.StatusCode.UNAVAILABLE
    plaintext = grpc.intercept_channel(grpc.insecure_channel(address), signature)
    with plaintext:
        assert _cluster_state(plaintext) == grpc.StatusCode.UNAVAILABLE


# -- client API keys and gateway TLS ------------------------------------------------------


@pytest.fixture(scope="module")
def secured_gateway(mesh, tmp_path_factory):
    """A second gateway on the shared mesh's scheduler with API keys and TLS."""
    directory = tmp_path_factory.mktemp("secured-gateway")
    make_certs(directory / "certs", ["127.0.0.1"], roles=["gateway"])
    keys = directory / "api-keys"
    keys.write_text(f"# test keys\nalice:{API_KEY}\n\nsk-other-key-0123456789  # unnamed\n")
    proc = start_service(
        "gateway",
        [
            "--bind", "127.0.0.1:0", "--http-bind", "127.0.0.1:0",
            "--scheduler", mesh.scheduler_address,
            "--api-keys-file", str(keys),
            "--tls-cert", str(directory / "certs" / "gateway.pem"),
            "--tls-key", str(directory / "certs" / "gateway-key.pem"),
        ],
        log_dir=directory,
        name="secured-gateway",
    )  # fmt: skip
    try:
        proc.wait_ready(TIMEOUT_S)
        ca = (directory / "certs" / "ca.pem").read_bytes()
        with Client(proc.address, api_key=API_KEY, root_certificates=ca) as client:
            deadline = time.monotonic() + TIMEOUT_S
            while client.model_info().num_instances < len(mesh.live_workers()):
                assert time.monotonic() < deadline, "the secured gateway never saw the workers"
                time.sleep(0.1)
        yield proc, directory / "certs" / "ca.pem"
    finally:
        stop_all([proc])


def _assert_nothing_reached_a_worker(mesh, gateway_proc, request_id: str = "") -> None:
    for worker in mesh.live_workers():
        load = worker_load(worker.address).load  # at once: a 64-token request would show
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
    if request_id:
        assert log_events(gateway_proc.log_path, request_id) == []


def test_gateway_grpc_refuses_a_missing_or_wrong_key(mesh, secured_gateway):
    proc, ca_path = secured_gateway
    ca = ca_path.read_bytes()
    for key in (None, "sk-wrong-key-0000000000"):
        request_id = f"refused-{uuid.uuid4().hex}"
        with Client(proc.address, api_key=key, root_certificates=ca, timeout_s=TIMEOUT_S) as client:
            with pytest.raises(GatewayError) as refused:
                list(client.generate_stream(prompt_token_ids=[1, 2, 3], max_tokens=64, ignore_eos=True, request_id=request_id))  # fmt: skip
            assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
            assert "the gateway needs an API key" in refused.value.details
            with pytest.raises(GatewayError) as info_refused:
                client.model_info()
            assert info_refused.value.code is grpc.StatusCode.UNAUTHENTICATED
        _assert_nothing_reached_a_worker(mesh, proc, request_id)


def test_gateway_grpc_serves_a_right_key_with_exact_tokens(mesh, secured_gateway):
    proc, ca_path = secured_gateway
    sampling = {"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 12, "seed": 11, "temperature": 0.7}
    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as plain:  # the demo: keys off
        expected = plain.generate(**sampling).token_ids
    with Client(
        proc.address, api_key=API_KEY, root_certificates=ca_path.read_bytes(), timeout_s=TIMEOUT_S
    ) as client:
        streamed = [t for chunk in client.generate_stream(**sampling) for t in chunk.token_ids]
    assert len(expected) == 12 and tuple(streamed) == expected


def test_plaintext_clients_cannot_talk_to_the_tls_ports(secured_gateway):
    proc, _ = secured_gateway
    plaintext = Client(proc.address, api_key=API_KEY, timeout_s=10)
    with plaintext, pytest.raises(GatewayError) as failed:
        plaintext.model_info(timeout_s=10)
    assert failed.value.code is grpc.StatusCode.UNAVAILABLE
    http = proc.ready_info["http_address"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{http}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)  # fmt: skip


def _openai(proc, ca_path, api_key: str) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(ca_path))
    return openai.OpenAI(
        base_url=f"https://{proc.ready_info['http_address']}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=httpx.Client(verify=context),
    )


def test_http_api_refuses_a_wrong_key_and_serves_a_right_one(mesh, secured_gateway):
    proc, ca_path = secured_gateway
    before = len([e for e in log_events(proc.log_path) if e.get("event") == "http_request"])
    wrong = _openai(proc, ca_path, "sk-wrong-key-0000000000")
    with wrong, pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=64)
    assert refused.value.status_code == 401
    assert refused.value.body == {
        "message": "invalid API key; the gateway requires an API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    http = f"https://{proc.ready_info['http_address']}"
    context = ssl.create_default_context(cafile=str(ca_path))
    with httpx.Client(verify=context, timeout=TIMEOUT_S) as bare:
        missing = bare.post(f"{http}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert (missing.status_code, missing.headers["www-authenticate"]) == (401, "Bearer")
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert bare.get(f"{http}/health").json() == {"status": "ok", "num_instances": len(mesh.live_workers())}  # fmt: skip
    _assert_nothing_reached_a_worker(mesh, proc)
    after = len([e for e in log_events(proc.log_path) if e.get("event") == "http_request"])
    assert after == before  # the request path never saw them

    prompt_ids = [9, 8, 7, 6]
    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as plain:
        expected = list(plain.generate(prompt_token_ids=prompt_ids, max_tokens=10, ignore_eos=True).token_ids)  # fmt: skip
    with _openai(proc, ca_path, API_KEY) as api:
        response = api.completions.create(
            model="tiny", prompt=prompt_ids, max_tokens=10, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
    assert response.choices[0].token_ids == expected


def test_a_whole_mesh_under_cluster_mtls_serves_exact_tokens_and_operator_commands(
    tmp_path, reference_engine, monkeypatch, capsys
):
    """Scheduler, gateway and two workers with --cluster-tls-dir (the environment
    variable, as compose sets it): registration, load streams, dispatch, submit and the
    outputs' push to the gateway's internal port all go over mTLS; `./llmesh status`
    with the same variables is a member."""
    from services.cli.main import main
    from services.common.procs import LocalMesh
    from tests.integration.conftest import reference_tokens

    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"])
    env = {"LLMESH_CLUSTER_TLS_DIR": str(certs), "LLMESH_WORKER_TORCH_THREADS": "1"}
    with LocalMesh(log_dir=tmp_path / "mesh", num_workers=2, env=env) as mesh:
        with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            got = [client.generate(prompt_token_ids=[4, 2, 4 + i], max_tokens=6, seed=i) for i in range(4)]  # fmt: skip
        expected = reference_tokens(
            reference_engine, [([4, 2, 4 + i], {"max_tokens": 6, "seed": i}) for i in range(4)]
        )
        assert [list(g.token_ids) for g in got] == expected
        # A plaintext member (right secret, no certificate) is turned away at the handshake.
        from services.common.grpc_client import cluster_channel

        with cluster_channel(mesh.scheduler_address) as plaintext:
            assert _cluster_state(plaintext) == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setenv("LLMESH_CLUSTER_TLS_DIR", str(certs))
        cluster_auth.install(None)  # found again from the environment, now with mTLS
        try:
            assert main(["status", "--scheduler", mesh.scheduler_address, "--json"]) == 0
        finally:
            monkeypatch.delenv("LLMESH_CLUSTER_TLS_DIR")
            cluster_auth.install(None)
        status = json.loads(capsys.readouterr().out)
        assert sorted(i["instance_id"] for i in status["instances"]) == ["worker-0", "worker-1"]

"""Valid requests per RPC, the starting points `proto_strategies.mutated` rewrites.

A method without seeds here is still fuzzed with arbitrary messages; seeds only make
more cases get past validation. Requests that run the model ask for few tokens
(`cap_cost` keeps mutated ones cheap too) so ten thousand cases fit a CI run.
"""

from __future__ import annotations

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from protos import common_pb2, gateway_pb2, group_pb2, scheduler_pb2, worker_pb2
from tests.fuzz.harness import MeshFacts

MAX_FUZZ_TOKENS = 4
PROMPT = [1, 2, 3, 4, 5]


def _sampling(**kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=MAX_FUZZ_TOKENS, **kwargs)


def _state(request_id: str, owner: str) -> common_pb2.RequestState:
    return common_pb2.RequestState(
        request_id=request_id,
        prompt_token_ids=PROMPT,
        sampling=_sampling(seed=7),
        owner_address=owner,
    )


def _group(facts: MeshFacts, formable: bool = False) -> group_pb2.GroupState:
    """The two workers as a group; `formable` = a plan stage 0 really carries out (the
    tiny model's 4 layers split in two), else one every member refuses (no layers).
    Only FormGroup gets a formable one: a member that accepted a PrepareJoin refuses new
    requests until its JoinGroup comes or the join expires (2 x rpc_timeout_s, 120 s),
    and JoinGroup from anyone but a leader would leave it in a group no scheduler
    knows of."""
    members = [
        group_pb2.GroupMember(
            instance_id=i,
            address=a,
            transport_address=t,
            stage=n,
            layer_start=2 * n if formable else 0,
            layer_end=2 * n + 2 if formable else 0,
        )
        for n, (i, a, t) in enumerate(
            zip(facts.worker_ids, facts.worker_addresses, facts.transport_addresses, strict=True)
        )
    ]
    status = group_pb2.GROUP_STATUS_DROPPING if formable else group_pb2.GROUP_STATUS_UNSPECIFIED
    return group_pb2.GroupState(
        group_id="group-fuzz", members=members, block_size=16, status=status
    )


def seeds_for(name: str, facts: MeshFacts) -> list[Message]:  # noqa: C901 - one table
    ids, addrs = facts.worker_ids, facts.worker_addresses
    gen = gateway_pb2.GenerateRequest
    table: dict[str, list[Message]] = {
        "llmesh.v1.Gateway/Generate": [
            gen(prompt_token_ids=PROMPT, sampling=_sampling()),
            gen(prompt="Hello", sampling=_sampling(temperature=0.8, top_p=0.9, seed=3)),
            gen(prompt_token_ids=PROMPT, sampling=_sampling(), priority=1, detokenize=True),
        ],
        "llmesh.v1.Gateway/Abort": [gateway_pb2.AbortRequest(request_id="fuzz-req")],
        "llmesh.v1.Gateway/Resume": [gateway_pb2.ResumeRequest(request_id="fuzz-gone")],
        "llmesh.v1.Gateway/GetModelInfo": [gateway_pb2.GetModelInfoRequest()],
        "llmesh.v1.OutputSink/PushOutputs": [
            gateway_pb2.OutputBatch(
                instance_id=ids[0],
                outputs=[
                    gateway_pb2.RequestOutput(
                        request_id="fuzz-orphan", first_token_index=0, token_ids=[5]
                    )
                ],
            )
        ],
        "llmesh.v1.Scheduler/RegisterInstance": [
            scheduler_pb2.RegisterInstanceRequest(
                info=common_pb2.InstanceInfo(
                    instance_id="fuzz-instance",
                    address="127.0.0.1:9",
                    model_id="tiny",
                    memory_capacity_bytes=1 << 20,
                    block_size=16,
                    layer_end=2,
                    num_layers=2,
                    max_model_len=256,
                    vocab_size=256,
                    eos_token_id=2,
                )
            )
        ],
        "llmesh.v1.Scheduler/StreamLoad": [
            common_pb2.LoadReport(instance_id=i, seq=1, num_total_blocks=64) for i in ids
        ],
        "llmesh.v1.Scheduler/DeregisterInstance": [
            scheduler_pb2.DeregisterInstanceRequest(instance_id="fuzz-instance")
        ],
        "llmesh.v1.Scheduler/Dispatch": [
            scheduler_pb2.DispatchRequest(request_id="fuzz-dispatch", num_prompt_tokens=5)
        ],
        "llmesh.v1.Scheduler/GetClusterState": [scheduler_pb2.GetClusterStateRequest()],
        "llmesh.v1.Scheduler/Migrate": [
            scheduler_pb2.SchedulerMigrateRequest(
                src_instance_id=ids[0], dst_instance_id=ids[1], num_requests=1
            )
        ],
        "llmesh.v1.Scheduler/Drain": [
            scheduler_pb2.SchedulerDrainRequest(instance_id=ids[0], is_terminating=False)
        ],
        "llmesh.v1.Scheduler/DropGroup": [
            scheduler_pb2.DropGroupRequest(instance_ids=[ids[0], "fuzz-missing"]),
            scheduler_pb2.DropGroupRequest(instance_ids=list(ids)),
        ],
        "llmesh.v1.Scheduler/RestoreGroup": [
            scheduler_pb2.RestoreGroupRequest(group_id=f"group-{n}") for n in range(1, 4)
        ],
        "llmesh.v1.Worker/Submit": [
            worker_pb2.SubmitRequest(state=_state("fuzz-submit", facts.gateway_address))
        ],
        "llmesh.v1.Worker/Abort": [worker_pb2.WorkerAbortRequest(request_id="fuzz-submit")],
        "llmesh.v1.Worker/Rehome": [
            worker_pb2.RehomeRequest(request_id="fuzz-gone", owner_address="127.0.0.1:1")
        ],
        "llmesh.v1.Worker/GetLoad": [worker_pb2.GetLoadRequest(check_integrity=True)],
        "llmesh.v1.Worker/MigrateOut": [
            worker_pb2.MigrateOutRequest(
                dst_instance_id=ids[1],
                dst_address=addrs[1],
                dst_transport_address=facts.transport_addresses[1],
                num_requests=1,
            )
        ],
        "llmesh.v1.Worker/PrepareMigration": [
            worker_pb2.PrepareMigrationRequest(
                migration_id="fuzz-mig",
                request_id="fuzz-mig-req",
                src_instance_id=ids[0],
                src_transport_address=facts.transport_addresses[0],
                num_blocks=1,
                lease_ms=500,
                num_tokens=5,
            )
        ],
        "llmesh.v1.Worker/MigrationStage": [
            worker_pb2.MigrationStageRequest(
                migration_id="fuzz-mig", num_blocks=1, transfer_id="t", is_last=True
            )
        ],
        "llmesh.v1.Worker/CommitMigration": [
            worker_pb2.CommitMigrationRequest(
                migration_id="fuzz-mig",
                state=_state("fuzz-mig-req", facts.gateway_address),
                num_blocks=1,
            )
        ],
        "llmesh.v1.Worker/AbortMigration": [
            worker_pb2.AbortMigrationRequest(migration_id="fuzz-mig", reason="fuzz")
        ],
        "llmesh.v1.Worker/FormGroup": [
            group_pb2.FormGroupRequest(group=_group(facts, formable=True))
        ],
        "llmesh.v1.Worker/DissolveGroup": [group_pb2.DissolveGroupRequest(group_id="group-fuzz")],
        "llmesh.v1.Worker/PrepareJoin": [group_pb2.PrepareJoinRequest(group=_group(facts))],
        "llmesh.v1.Worker/JoinGroup": [
            group_pb2.JoinGroupRequest(group=_group(facts), block_offset=0, epoch="e1")
        ],
        "llmesh.v1.Worker/Exchange": [group_pb2.ExchangeRequest(group_id="group-fuzz")],
        "llmesh.v1.Worker/ExchangeDone": [
            group_pb2.ExchangeDoneRequest(group_id="group-fuzz", request_id="r", stage=1)
        ],
        "llmesh.v1.Worker/LeaveGroup": [group_pb2.LeaveGroupRequest(group_id="group-fuzz")],
        "llmesh.v1.Worker/AbortGroup": [
            group_pb2.AbortGroupRequest(group_id="group-fuzz", reason="fuzz")
        ],
        "grpc.health.v1.Health/Check": [
            health_pb2.HealthCheckRequest(service=""),
            health_pb2.HealthCheckRequest(service="llmesh.v1.Worker"),
        ],
        "grpc.health.v1.Health/Watch": [health_pb2.HealthCheckRequest(service="")],
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="llmesh.v1.Worker"),
        ],
    }
    table["llmesh.v1.Gateway/GenerateUnary"] = table["llmesh.v1.Gateway/Generate"]
    return table.get(name, [])


def cap_cost(message: Message) -> Message:
    """Keep a mutated request that would run the model short: a plausible max_tokens
    becomes MAX_FUZZ_TOKENS (extreme values stay, for validation to refuse)."""
    sampling = None
    if isinstance(message, gateway_pb2.GenerateRequest):
        sampling = message.sampling
    elif isinstance(message, worker_pb2.SubmitRequest | worker_pb2.CommitMigrationRequest):
        sampling = message.state.sampling
    if sampling is not None and MAX_FUZZ_TOKENS < sampling.max_tokens <= 1_000_000:
        sampling.max_tokens = MAX_FUZZ_TOKENS
    return message

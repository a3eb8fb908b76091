"""Configuration of one simulation run."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ConfigError
from services.policies import (
    DISPATCH_POLICIES,
    GROUP_POLICIES,
    MIGRATION_POLICIES,
    SELECTION_POLICIES,
    LoadModelConfig,
    MigrationConfig,
    ScalingConfig,
)
from services.policies.kunserve import GroupConfig
from services.policies.presets import preset
from services.worker.engine.micro_batching import FORMATIONS


@dataclass(frozen=True)
class SimConfig:
    """A cluster, its engines' knobs, and the policies that drive it."""

    # Instances at t = 0 (the auto-scaler may add and remove some).
    num_instances: int = 16
    # Cost-model profile name (see services/simulator/profiles.py).
    profile: str = "llama-7b-a10"
    # KV blocks per instance; None = the profile's.
    num_kv_blocks: int | None = None
    # Tokens per KV block.
    block_size: int = 16
    # Longest request (prompt + output); None = the profile's.
    max_model_len: int | None = None
    # Engine: most requests in a running batch.
    max_num_seqs: int = 256
    # Engine: token budget per step. >= the longest prompt means whole-prompt prefill
    # (vLLM v0 / Llumnix's testbed): a prompt is admitted only when all its blocks fit.
    max_num_batched_tokens: int = 4096
    # Engine queue order: "fcfs" or "priority".
    scheduling_policy: str = "fcfs"
    # False: the engine and the policies see every request as normal priority.
    use_priorities: bool = True
    # A preset of services/policies/presets.py (recompute, llumnix, kunserve, llmesh):
    # sets `dispatch`, `migration` and `group` (overriding them); "" = use those fields.
    policy: str = ""
    # Registered policy names.
    dispatch: str = "freest"
    migration: str = "freeness"
    selection: str = "lowest_priority_first"
    # KunServe group policy ("none": no instance ever drops its layers) and its knobs
    # (weight_share is taken from the profile: weights / memory of one instance).
    group: str = "none"
    group_config: GroupConfig = GroupConfig()
    # Micro-batches a group keeps in flight (0 = one per stage).
    micro_batches: int = 0
    # How a group's leader forms them (services/worker/engine/micro_batching.py, as the
    # live worker's KunServeConfig.micro_batching): "lookahead" (balanced by the cost
    # model, long prefills chunked) or "simple" (1/M of the step's limits each).
    micro_batching: str = "lookahead"
    # Lookahead: the smallest prefill chunk cut below a prompt's remainder.
    min_chunk_tokens: int = 32
    # Fixed cost of one activation hand-off between pipeline stages, seconds.
    activation_hop_latency_s: float = 0.0
    # Seconds of work each member's join takes once it is between steps (the live
    # JoinGroup: export its requests, copy the KV slices it gives up to host memory, drop
    # layers, re-lay the pool, hand over to stage 0; a job on the shared host when
    # host_cores is set). The group serves when every member has joined. 0 = at once.
    group_join_s: float = 0.0
    # False: a member joins at its first step boundary after the drop decision. True (the
    # live protocol, services/worker/kunserve/leader.py): PrepareJoin runs at each
    # member's next boundary and the member steps on; once every member has prepared,
    # JoinGroup runs at each one's next boundary (group_join_s of work there); stage 0,
    # if it prepared last, joins at that boundary (its JoinGroup is a local call).
    group_two_phase_join: bool = False
    # Knobs of the load model, the migration loop and the auto-scaler (None = fixed fleet).
    load_model: LoadModelConfig = LoadModelConfig()
    migration_config: MigrationConfig = MigrationConfig()
    scaling: ScalingConfig | None = None
    # Seconds from a request's arrival until it reaches an instance (gateway, dispatch
    # and submit RPCs of the live mesh; 0 = ideal). Counts toward TTFT.
    dispatch_latency_s: float = 0.0
    # False: a dispatched request joins its instance's engine at once. True (the live
    # mesh): it joins between two steps, as the worker admits it; meanwhile the worker
    # reports it as a waiting request (services/worker/llumlet.py, Intake), so the
    # policies see it from its arrival on.
    live_admission: bool = False
    # False: the policies see each instance's load as it is at that instant. True (the
    # live mesh): as its worker reports it, a snapshot taken after each engine step,
    # before the requests that arrived meanwhile are admitted and the next step is
    # scheduled (services/worker/async_engine.py), plus the requests that reached it
    # since that snapshot; a group member's is current (snapshots every micro-batch).
    load_at_step_end: bool = False
    # Seconds every engine step costs beyond the cost model (the live worker's serving
    # loop around the engine: output push, asyncio; 0 = ideal).
    step_overhead_s: float = 0.0
    # CPU cores the whole mesh shares (the fidelity bench: workers, gateway, scheduler
    # and client as processes on one machine). Set, every step, every request's dispatch
    # latency and the streaming of every step's tokens are work on these cores, and
    # while more jobs run than there are cores each slows down (processor sharing,
    # host.py). None = one accelerator per instance, nothing shared.
    host_cores: float | None = None
    # With host_cores: runnable threads of other processes on the machine, on average
    # (they share the cores with the mesh's jobs; 0 = the mesh has the machine).
    host_background_jobs: float = 0.0
    # With host_cores: CPU seconds the mesh spends per generated token outside the
    # worker's step (gateway and client relaying it); it competes with the steps.
    stream_cpu_per_token_s: float = 0.0
    # Seconds from a scale-up decision until the new instance serves (model load).
    instance_startup_s: float = 10.0
    # Migration link bandwidth (bytes/s; 64 Gb/s-class network = 8e9).
    migration_bandwidth_bytes_per_s: float = 8e9
    # Fixed cost of each migration stage (control RPCs), seconds.
    migration_stage_overhead_s: float = 0.001
    # Stop-and-copy once at most this many blocks remain to copy.
    last_stage_max_blocks: int = 2
    # Run every block manager's integrity check at the end.
    check_integrity: bool = True

    def __post_init__(self) -> None:
        if self.policy:
            chosen = preset(self.policy)  # raises ConfigError naming the presets
            object.__setattr__(self, "dispatch", chosen.dispatch_policy)
            object.__setattr__(self, "migration", chosen.migration_policy)
            object.__setattr__(self, "group", chosen.group_policy)
        if self.num_instances < 1:
            raise ConfigError(f"num_instances={self.num_instances} must be >= 1")
        for name, registry in (
            ("dispatch", DISPATCH_POLICIES),
            ("migration", MIGRATION_POLICIES),
            ("selection", SELECTION_POLICIES),
            ("group", GROUP_POLICIES),
        ):
            value = getattr(self, name)
            if value not in registry:
                raise ConfigError(f"{name}={value!r} is not one of {sorted(registry)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be >= 1")
        if self.step_overhead_s < 0:
            raise ConfigError(f"step_overhead_s={self.step_overhead_s} must be >= 0")
        if self.dispatch_latency_s < 0:
            raise ConfigError(f"dispatch_latency_s={self.dispatch_latency_s} must be >= 0")
        if self.host_cores is not None and not self.host_cores > 0:
            raise ConfigError(f"host_cores={self.host_cores} must be > 0 (or None)")
        if self.host_background_jobs < 0:
            raise ConfigError(f"host_background_jobs={self.host_background_jobs} must be >= 0")
        if self.stream_cpu_per_token_s < 0:
            raise ConfigError(f"stream_cpu_per_token_s={self.stream_cpu_per_token_s} must be >= 0")
        if self.instance_startup_s < 0:
            raise ConfigError(f"instance_startup_s={self.instance_startup_s} must be >= 0")
        if not self.migration_bandwidth_bytes_per_s > 0:
            raise ConfigError(
                f"migration_bandwidth_bytes_per_s={self.migration_bandwidth_bytes_per_s} must be > 0"
            )
        if self.group != "none" and self.scaling is not None:
            raise ConfigError(f"group={self.group!r} with auto-scaling is not supported")
        if self.micro_batches < 0:
            raise ConfigError(f"micro_batches={self.micro_batches} must be >= 0")
        if self.micro_batching not in FORMATIONS:
            raise ConfigError(
                f"micro_batching={self.micro_batching!r} is not one of {list(FORMATIONS)}"
            )
        if self.min_chunk_tokens < 1:
            raise ConfigError(f"min_chunk_tokens={self.min_chunk_tokens} must be >= 1")
        if self.group_join_s < 0:
            raise ConfigError(f"group_join_s={self.group_join_s} must be >= 0")
        if self.activation_hop_latency_s < 0:
            raise ConfigError(
                f"activation_hop_latency_s={self.activation_hop_latency_s} must be >= 0"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(
                f"scheduling_policy={self.scheduling_policy!r} is not fcfs or priority"
            )

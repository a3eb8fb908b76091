"""KunServe on a worker: parameter dropping, cooperative pipeline execution, KV exchange
and restore, as one member of a group (see docs/kunserve.md).

    types.py     Role state machine, the messages between members
    config.py    KunServeConfig (WorkerConfig.kunserve)
    client.py    stage 0's calls to the other members (gRPC)
    member.py    GroupMembership: what every member does (join, exchange, leave, abort)
    leader.py    GroupLeader: what stage 0 does (form, schedule, dissolve)
    pipeline.py  PipelineDriver (stage 0's stepper), StageRunner (stages > 0)
    wire.py      micro-batch metadata on the data plane
    exchange.py  KV transfers between members, yielding to activations
    weights.py   layer weights between members at a restore
"""

from services.worker.kunserve.config import KunServeConfig
from services.worker.kunserve.member import GroupMembership, MemberHooks
from services.worker.kunserve.types import GroupError, HandedRequest, JoinReply, PrepareReply, Role

__all__ = [
    "GroupError",
    "GroupMembership",
    "HandedRequest",
    "JoinReply",
    "KunServeConfig",
    "MemberHooks",
    "PrepareReply",
    "Role",
]

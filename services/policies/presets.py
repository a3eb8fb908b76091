"""Policy presets: the systems a comparison runs, each a choice of one policy per kind.

    preset      dispatch      migration   groups     what it stands for
    recompute   load_balance  none        none       vLLM's default: memory-aware
                                                     dispatch, preempt and recompute
    llumnix     freest        freeness    none       Llumnix: live migration by freeness
    kunserve    load_balance  none        kunserve   KunServe: drop parameters, pipeline
    llmesh      freest        freeness    llmesh     both: migrate while the instances with
                                                     room can absorb the queue, drop when
                                                     they cannot (default)

`swap` (preempt to host memory over PCIe) is not a preset: the engine has no swap
space; a preempted request recomputes in every preset.

The live scheduler takes a preset with `--policy` (it sets the three names; a name
given explicitly as well wins), the simulator with `SimConfig.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ConfigError


@dataclass(frozen=True)
class PolicyPreset:
    name: str
    dispatch_policy: str
    migration_policy: str
    group_policy: str


PRESETS: dict[str, PolicyPreset] = {
    p.name: p
    for p in (
        PolicyPreset("recompute", "load_balance", "none", "none"),
        PolicyPreset("llumnix", "freest", "freeness", "none"),
        PolicyPreset("kunserve", "load_balance", "none", "kunserve"),
        PolicyPreset("llmesh", "freest", "freeness", "llmesh"),
    )
}
DEFAULT_PRESET = "llmesh"


def preset(name: str) -> PolicyPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"policy preset {name!r} is unknown; choose from {sorted(PRESETS)}"
        ) from None

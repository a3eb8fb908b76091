"""SchedulerConfig: the policy preset, the names given explicitly, the group knobs."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.policies import GroupConfig
from services.scheduler.__main__ import parse_args
from services.scheduler.config import SchedulerConfig


def policies(config: SchedulerConfig) -> tuple[str, str, str]:
    return (config.dispatch_policy, config.migration_policy, config.group_policy)


def test_the_default_preset_is_llmesh_migration_and_drops():
    config = SchedulerConfig()
    assert config.policy == "llmesh"
    assert policies(config) == ("freest", "freeness", "llmesh")


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("recompute", ("load_balance", "none", "none")),
        ("llumnix", ("freest", "freeness", "none")),
        ("kunserve", ("load_balance", "none", "kunserve")),
        ("llmesh", ("freest", "freeness", "llmesh")),
    ],
)
def test_a_preset_sets_the_three_policies(preset, expected):
    assert policies(SchedulerConfig(policy=preset)) == expected


def test_a_policy_given_explicitly_wins_over_the_preset_from_flags_and_env():
    config = load_config(
        SchedulerConfig,
        "SCHEDULER",
        vars(parse_args(["--policy", "kunserve", "--dispatch-policy", "freest"])),
        environ={"LLMESH_SCHEDULER_GROUP_POLICY": "llmesh"},
    )
    assert (config.policy, *policies(config)) == ("kunserve", "freest", "none", "llmesh")
    config = load_config(
        SchedulerConfig,
        "SCHEDULER",
        vars(parse_args(["--migration-policy", "freeness"])),
        environ={"LLMESH_SCHEDULER_POLICY": "recompute"},
    )
    assert policies(config) == ("load_balance", "freeness", "none")


def test_the_group_knobs_make_the_group_config():
    config = load_config(
        SchedulerConfig,
        "SCHEDULER",
        vars(
            parse_args(
                [
                    "--group-interval-s",
                    "0.1",
                    "--group-vote-demand-at-least",
                    "0.9",
                    "--group-vote-window-s",
                    "0.3",
                    "--group-sizes",
                    "2,4,8",
                    "--group-weight-share",
                    "0.4",
                    "--group-restore-usage-at-most",
                    "0.25",
                    "--group-restore-window-s",
                    "0.5",
                    "--group-hold-s",
                    "1",
                    "--migration-dst-freeness-above",
                    "6",
                ]
            )  # fmt: skip
        ),
        environ={},
    )
    assert config.group_config() == GroupConfig(
        interval_s=0.1,
        vote_demand_at_least=0.9,
        vote_window_s=0.3,
        group_sizes=(2, 4, 8),
        weight_share=0.4,
        restore_usage_at_most=0.25,
        restore_window_s=0.5,
        hold_s=1.0,
        migration_dst_freeness_above=6.0,
    )
    # The defaults are GroupConfig's.
    assert SchedulerConfig().group_config() == GroupConfig()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"policy": "vllm"}, "policy='vllm' is not one of ['kunserve', 'llmesh', 'llumnix', 'recompute']"),
        ({"group_policy": "nope"}, "group_policy='nope' is not one of ['kunserve', 'llmesh', 'none']"),
        ({"group_interval_s": 0.0}, "group_interval_s=0.0 must be > 0"),
        ({"group_vote_window_s": -1.0}, "group_vote_window_s=-1.0 must be >= 0"),
        ({"group_vote_demand_at_least": 0.0}, "group_vote_demand_at_least=0.0 must be > 0"),
        (
            {"group_restore_usage_at_most": 0.96},
            "group_restore_usage_at_most=0.96 must be in [0, group_vote_demand_at_least=0.95)",
        ),
        ({"group_restore_window_s": -0.5}, "group_restore_window_s=-0.5 must be >= 0"),
        ({"group_hold_s": -1.0}, "group_hold_s=-1.0 must be >= 0"),
        ({"group_sizes": (4, 2)}, "group_sizes=(4, 2) must be increasing ints >= 2"),
        ({"group_sizes": (1,)}, "group_sizes=(1,) must be increasing ints >= 2"),
        ({"group_weight_share": 1.0}, "group_weight_share=1.0 must be in [0, 1)"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_field(changes, message):
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(**changes)
    assert str(info.value) == message

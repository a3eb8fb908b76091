from dataclasses import dataclass

import pytest

from services.common.config import ConfigError, load_config, require


@dataclass(frozen=True)
class DemoConfig:
    """A config shaped like the services' ones."""

    bind: str = "127.0.0.1:0"
    num_workers: int = 2
    ratio: float = 0.5
    is_verbose: bool = False
    tags: tuple[str, ...] = ()
    otlp_endpoint: str | None = None

    def __post_init__(self):
        require(self.num_workers >= 1, f"num_workers={self.num_workers} must be >= 1")


def test_defaults_env_and_overrides_in_that_order():
    env = {
        "LLMESH_DEMO_NUM_WORKERS": "4",
        "LLMESH_DEMO_RATIO": "0.25",
        "LLMESH_DEMO_IS_VERBOSE": "yes",
        "LLMESH_DEMO_TAGS": "a, b",
        "LLMESH_DEMO_OTLP_ENDPOINT": "none",
        "LLMESH_OTHER_NUM_WORKERS": "9",
    }
    cfg = load_config(DemoConfig, "demo", {"bind": "0.0.0.0:7000", "ratio": None}, environ=env)
    assert cfg == DemoConfig(
        bind="0.0.0.0:7000",
        num_workers=4,
        ratio=0.25,
        is_verbose=True,
        tags=("a", "b"),
        otlp_endpoint=None,
    )


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="LLMESH_DEMO_NUM_WORKERS='many'"):
        load_config(DemoConfig, "demo", environ={"LLMESH_DEMO_NUM_WORKERS": "many"})
    with pytest.raises(ConfigError, match="LLMESH_DEMO_IS_VERBOSE"):
        load_config(DemoConfig, "demo", environ={"LLMESH_DEMO_IS_VERBOSE": "maybe"})


def test_validation_error_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="num_workers=0 must be >= 1"):
        load_config(DemoConfig, "demo", {"num_workers": 0}, environ={})

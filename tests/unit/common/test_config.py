import argparse
from dataclasses import dataclass, field

import pytest

from services.common.config import ENV, ConfigError, flag_type, load_config, require


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


@dataclass(frozen=True)
class InnerConfig:
    size: int = 1
    mode: str = field(default="a", metadata={ENV: "LLMESH_MODE"})

    def __post_init__(self):
        require(self.size >= 1, f"size={self.size} must be >= 1")


@dataclass(frozen=True)
class OuterConfig:
    name: str = "x"
    inner: InnerConfig = field(default_factory=InnerConfig)
    other: InnerConfig = field(default_factory=InnerConfig)


def test_nested_configs_load_from_prefixed_env_and_dotted_or_nested_overrides():
    env = {"LLMESH_OUTER_INNER_SIZE": "3", "LLMESH_OUTER_OTHER_MODE": "b"}
    cfg = load_config(OuterConfig, "outer", {"name": "y", "other.size": 7}, environ=env)
    assert cfg == OuterConfig("y", InnerConfig(3, "a"), InnerConfig(7, "b"))
    cfg = load_config(OuterConfig, "outer", {"inner": {"size": 2}}, environ={})
    assert cfg == OuterConfig("x", InnerConfig(2, "a"), InnerConfig(1, "a"))
    cfg = load_config(OuterConfig, "outer", {"inner": InnerConfig(4, "c")}, environ=env)
    assert cfg == OuterConfig("x", InnerConfig(4, "c"), InnerConfig(1, "b"))


def test_a_field_also_reads_its_process_wide_variable_below_its_own():
    assert load_config(OuterConfig, "outer", environ={"LLMESH_MODE": "b"}) == OuterConfig(
        "x", InnerConfig(1, "b"), InnerConfig(1, "b")
    )
    env = {"LLMESH_MODE": "b", "LLMESH_OUTER_INNER_MODE": "c"}
    assert load_config(OuterConfig, "outer", {"other.mode": "d"}, environ=env) == OuterConfig(
        "x", InnerConfig(1, "c"), InnerConfig(1, "d")
    )


def test_a_bad_nested_value_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="size=0 must be >= 1"):
        load_config(OuterConfig, "outer", environ={"LLMESH_OUTER_OTHER_SIZE": "0"})
    with pytest.raises(ConfigError, match="LLMESH_OUTER_INNER_SIZE='big'"):
        load_config(OuterConfig, "outer", environ={"LLMESH_OUTER_INNER_SIZE": "big"})


@dataclass(frozen=True)
class SizedConfig:
    buffer_bytes: int = 1024
    limit: int | None = None


@pytest.mark.parametrize(
    ("raw", "num_bytes"),
    [("4096", 4096), ("4KiB", 4096), ("0.25MiB", 1 << 18), ("2 gib", 2 << 30), ("1.5", 1)],
)
def test_a_bytes_field_takes_a_size_with_a_binary_unit(raw, num_bytes):
    env = {"LLMESH_SIZED_BUFFER_BYTES": raw}
    assert load_config(SizedConfig, "sized", environ=env).buffer_bytes == num_bytes


@pytest.mark.parametrize("raw", ["0", "-4KiB", "0.1", "16MB", "MiB", "1e-10GiB"])
def test_a_size_below_one_byte_or_misspelled_is_refused_naming_the_variable(raw):
    with pytest.raises(ConfigError, match=f"LLMESH_SIZED_BUFFER_BYTES='{raw}' is not a size"):
        load_config(SizedConfig, "sized", environ={"LLMESH_SIZED_BUFFER_BYTES": raw})


def test_a_flag_parses_like_the_env_var_and_its_none_overrides_it():
    parse_limit = flag_type(int | None, "limit", "--limit")
    parse_size = flag_type(int, "buffer_bytes", "--buffer-bytes")
    env = {"LLMESH_SIZED_LIMIT": "3", "LLMESH_SIZED_BUFFER_BYTES": "1MiB"}
    flags = {"limit": parse_limit("none"), "buffer_bytes": parse_size("2KiB")}
    assert load_config(SizedConfig, "sized", flags, environ=env) == SizedConfig(2048, None)
    with pytest.raises(argparse.ArgumentTypeError, match="--buffer-bytes='0' is not a size"):
        parse_size("0")


def test_an_env_var_under_the_prefix_that_names_no_field_is_a_warning(caplog):
    env = {
        "LLMESH_OUTER_NAME": "y",
        "LLMESH_OUTER_INNER_SIZE": "3",
        "LLMESH_OUTER_LEASE_MS": "300",  # an old name
        "LLMESH_OUTER_INNER_SIZ": "4",  # a typo in a nested config's field
        "LLMESH_OUTER_OTHER": "5",  # a nested config is not a variable itself
        "LLMESH_OUTERMOST_NAME": "z",  # another prefix
        "LLMESH_MODE": "b",
    }
    with caplog.at_level("WARNING", logger="services.common.config"):
        cfg = load_config(OuterConfig, "outer", environ=env)
    assert cfg == OuterConfig("y", InnerConfig(3, "b"), InnerConfig(1, "b"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"LLMESH_OUTER_{name} matches no field of OuterConfig (loaded from LLMESH_OUTER_*): "
            "ignored",
        )
        for name in ("INNER_SIZ", "LEASE_MS", "OTHER")
    ]


def test_the_documented_non_config_variables_are_not_warned_about(caplog):
    @dataclass(frozen=True)
    class GatewayLike:
        bind: str = ""

    env = {"LLMESH_GATEWAY_ADDRESS": "h:1", "LLMESH_GATEWAY_BIND": "h:2"}
    with caplog.at_level("WARNING", logger="services.common.config"):
        assert load_config(GatewayLike, "gateway", environ=env) == GatewayLike("h:2")
        assert load_config(GatewayLike, "", environ={"LLMESH_ANYTHING": "1"}) == GatewayLike()
    assert caplog.records == []


def test_a_nested_config_with_another_default_than_its_class_is_refused():
    @dataclass(frozen=True)
    class Odd:
        inner: InnerConfig = field(default_factory=lambda: InnerConfig(size=5))

    with pytest.raises(
        TypeError, match=r"Odd.inner: declare .* field\(default_factory=InnerConfig"
    ):
        load_config(Odd, "odd", environ={})

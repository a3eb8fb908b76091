import numpy as np
import pytest

from services.simulator.workload import (
    LengthDistribution,
    SimRequest,
    WorkloadConfig,
    generate,
    load_trace,
    parse_length,
)


def test_same_seed_gives_the_same_workload():
    config = WorkloadConfig(num_requests=200, rate=5.0, seed=7)
    assert generate(config) == generate(config)


def test_different_seeds_give_different_workloads():
    a = generate(WorkloadConfig(num_requests=50, seed=1))
    b = generate(WorkloadConfig(num_requests=50, seed=2))
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]


def test_requests_are_sorted_numbered_and_start_at_zero():
    requests = generate(WorkloadConfig(num_requests=120, rate=3.0))
    assert requests[0].arrival_s == 0.0
    assert [r.request_id for r in requests[:3]] == ["r000", "r001", "r002"]
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(requests, requests[1:], strict=False))


def test_fixed_lengths_are_exact():
    config = WorkloadConfig(
        num_requests=10, prompt=parse_length("fixed:100"), output=parse_length("fixed:7")
    )
    assert {(r.num_prompt_tokens, r.num_output_tokens) for r in generate(config)} == {(100, 7)}


def test_changing_the_output_distribution_keeps_prompts_and_arrivals():
    base = WorkloadConfig(num_requests=50, output=parse_length("fixed:5"))
    other = WorkloadConfig(num_requests=50, output=parse_length("uniform:1:9"))
    a, b = generate(base), generate(other)
    assert [(r.arrival_s, r.num_prompt_tokens) for r in a] == [
        (r.arrival_s, r.num_prompt_tokens) for r in b
    ]


def test_lengths_stay_in_their_bounds():
    rng = np.random.default_rng(0)
    uniform = parse_length("uniform:32:64").sample(rng, 5000)
    assert (uniform.min(), uniform.max()) == (32, 64)
    zipf = parse_length("zipf:1.2:16:300").sample(rng, 5000)
    assert zipf.min() == 16 and zipf.max() <= 300
    exponential = parse_length("exponential:50").sample(rng, 5000)
    assert exponential.min() >= 1


def test_zipf_is_long_tailed():
    lengths = parse_length("zipf:1.5:16:4000").sample(np.random.default_rng(0), 100_000)
    assert np.median(lengths) < 60  # most are short
    assert np.percentile(lengths, 99) > 2000  # a few are very long


def test_exponential_mean():
    lengths = parse_length("exponential:200").sample(np.random.default_rng(0), 100_000)
    assert abs(lengths.mean() - 200.5) < 3  # ceil adds half a token on average


def test_mean_of_each_kind():
    assert parse_length("fixed:12").mean() == 12
    assert parse_length("uniform:10:20").mean() == 15
    assert parse_length("exponential:64").mean() == 64
    assert 240 < parse_length("zipf:1.5:16:4000").mean() < 260


def test_context_limit_truncates_the_output():
    config = WorkloadConfig(
        num_requests=20,
        prompt=parse_length("fixed:90"),
        output=parse_length("fixed:50"),
        max_total_tokens=100,
    )
    assert {(r.num_prompt_tokens, r.num_output_tokens) for r in generate(config)} == {(90, 10)}


def test_poisson_rate():
    requests = generate(WorkloadConfig(num_requests=20_000, rate=8.0, arrival="poisson"))
    gaps = np.diff([r.arrival_s for r in requests])
    assert abs(gaps.mean() - 1 / 8) < 0.005
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


def test_gamma_rate_and_burstiness():
    requests = generate(WorkloadConfig(num_requests=50_000, rate=8.0, arrival="gamma", cv=3.0))
    gaps = np.diff([r.arrival_s for r in requests])
    assert abs(gaps.mean() - 1 / 8) < 0.01
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.3


def test_high_priority_fraction():
    requests = generate(WorkloadConfig(num_requests=10_000, high_priority_fraction=0.1))
    assert {r.priority for r in requests} == {0, 1}
    assert abs(sum(r.priority for r in requests) / 10_000 - 0.1) < 0.01


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope:1", "not one of"),
        ("fixed", "takes 1 parameter"),
        ("fixed:0", "must be >= 1"),
        ("uniform:9:3", "LO <= HI"),
        ("zipf:1.2:0:10", "A > 0"),
        ("exponential:x", "must be numbers"),
    ],
)
def test_bad_length_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_length(spec)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_requests": 0}, "num_requests=0"),
        ({"rate": 0}, "rate=0"),
        ({"arrival": "burst"}, "arrival='burst'"),
        ({"cv": -1}, "cv=-1"),
        ({"high_priority_fraction": 2}, "high_priority_fraction=2"),
        ({"max_total_tokens": 1}, "max_total_tokens=1"),
    ],
)
def test_bad_workload_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)


def test_length_distribution_spec_round_trips():
    assert LengthDistribution("zipf", (1.5, 16, 4000)).spec == "zipf:1.5:16:4000"


def test_trace_replay_sorts_and_numbers(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "arrival_time_s,prompt_len,output_len,priority\n0.5,10,3,0\n0.1,20,4,1\n0.5,30,5,\n"
    )
    assert load_trace(path) == [
        SimRequest("r0", 0.1, 20, 4, 1),
        SimRequest("r1", 0.5, 10, 3, 0),
        SimRequest("r2", 0.5, 30, 5, 0),
    ]


def test_trace_without_priority_column_and_with_a_context_limit(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_time_s,prompt_len,output_len,extra\n0,90,50,x\n")
    assert load_trace(path, max_total_tokens=100) == [SimRequest("r0", 0.0, 90, 10, 0)]


def test_trace_errors_name_the_problem(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_time_s,prompt_len\n0,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['output_len'\]"):
        load_trace(path)
    path.write_text("arrival_time_s,prompt_len,output_len\n0,1,1\n0,x,1\n")
    with pytest.raises(ValueError, match="line 3: bad number"):
        load_trace(path)
    path.write_text("arrival_time_s,prompt_len,output_len\n0,0,1\n")
    with pytest.raises(ValueError, match="line 2: need arrival >= 0"):
        load_trace(path)


def test_rate_schedule_follows_its_segments():
    config = WorkloadConfig(
        num_requests=30_000, arrival="poisson", rate_schedule=((10.0, 2.0), (10.0, 18.0))
    )
    arrivals = np.array([r.arrival_s for r in generate(config)])
    phase = arrivals % 20.0
    num_cycles = arrivals[-1] / 20.0
    slow = np.count_nonzero(phase < 10.0) / (10.0 * num_cycles)
    fast = np.count_nonzero(phase >= 10.0) / (10.0 * num_cycles)
    assert abs(slow - 2.0) < 0.2 and abs(fast - 18.0) < 1.0


def test_rate_schedule_validation():
    with pytest.raises(ValueError, match=r"segment \(0.0, 5.0\)"):
        WorkloadConfig(rate_schedule=((0.0, 5.0),))

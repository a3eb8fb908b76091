"""`llmesh generate --local` and `llmesh calibrate` end to end, in process."""

from __future__ import annotations

import json

import pytest

from services.cli.generate import read_requests
from services.cli.main import main
from services.common.config import load_config
from services.worker.engine import CostModelProfile, EngineConfig, LLMEngine, SamplingParams


def test_generate_local_prints_one_json_object_per_request(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "Hello"}),
                json.dumps(
                    {
                        "prompt_ids": [256, 1, 2, 3],
                        "max_tokens": 5,
                        "temperature": 0.8,
                        "top_p": 0.9,
                        "top_k": 20,
                        "seed": 1,
                    }
                ),
                "",
                json.dumps({"prompt_ids": [999]}),
            ]
        )
    )
    assert (
        main(["generate", "--local", "--model", "tiny", "--prompts-file", str(prompts), "--json"])
        == 1
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    # Loaded like the CLI's engine, so `LLMESH_KERNELS` picks the same kernels for both.
    engine = LLMEngine.from_config(
        load_config(
            EngineConfig, "ENGINE", {"num_kv_blocks": 16, "memory_capacity_bytes": 32 * 2**20}
        )
    )
    expected = engine.generate([engine.tokenizer.encode("Hello")], SamplingParams(max_tokens=16))[0]
    assert lines[0] == {
        "index": 0,
        "token_ids": expected.new_token_ids,
        "text": engine.tokenizer.decode(expected.new_token_ids),
        "finish_reason": expected.finish_reason,
    }
    assert len(lines[1]["token_ids"]) == 5 and lines[1]["finish_reason"] == "length"
    assert lines[2] == {
        "index": 2,
        "error": "InvalidTokenError: token id 999 is not an int in [0, 258)",
    }
    # The same seed gives the same tokens on a second run.
    assert main(["generate", "--local", "--prompts-file", str(prompts), "--json"]) == 1
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert again == lines


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{", "line 1: not JSON"),
        ('{"prompt": "a", "prompt_ids": [1]}', "exactly one of"),
        ('{"max_tokens": 3}', "exactly one of"),
        ('{"prompt": 3}', "'prompt' must be a string"),
        ('{"prompt": "a", "temp": 1}', "unknown fields"),
    ],
)
def test_malformed_lines_name_the_line(line, message):
    with pytest.raises(ValueError, match=message):
        read_requests([line])


def test_generate_requires_local_for_now(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    assert main(["generate", "--prompts-file", str(tmp_path / "p.jsonl")]) == 2


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert (
        main(["calibrate", "--model", "tiny", "--out", str(out), "--quick", "--repeats", "1"]) == 0
    )
    profile = CostModelProfile.load(out)
    assert profile.name == "tiny-cpu" and profile.model.num_layers == 4
    assert all(c >= 0 for c in profile.coefficients()) and sum(profile.coefficients()) > 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(out)

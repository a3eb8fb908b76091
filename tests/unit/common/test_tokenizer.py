"""services.common.tokenizer: the tokenizers, loaded without torch or the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[3]


def build_tokenizer_json(path: Path) -> None:
    """A tiny BPE tokenizer.json with "<s>" (id 0) prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["hello mesh"] * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tokenizer.save(str(path / "tokenizer.json"))


def test_byte_tokenizer_prepends_bos_and_decodes_bytes_only():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("hé") == [256, 104, 195, 169]
    assert tokenizer.decode([256, 104, 195, 169, 257]) == "hé"


def test_a_checkpoint_directory_gives_its_tokenizer_json(tmp_path):
    build_tokenizer_json(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("hello mesh")
    assert ids[0] == 0 and len(ids) > 1
    assert tokenizer.decode(ids) == "hello mesh"


def test_what_is_no_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither 'tiny' nor a checkpoint directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no tokenizer.json in that directory"):
        load_tokenizer(str(tmp_path))


def test_the_gateway_loads_a_tokenizer_without_torch_or_the_engine(tmp_path):
    build_tokenizer_json(tmp_path)
    script = f"""
import json, sys
import gateway.server
from services.common.tokenizer import load_tokenizer
texts = [load_tokenizer(m).decode(load_tokenizer(m).encode("hi")) for m in ("tiny", {str(tmp_path)!r})]
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("services.worker"))
print(json.dumps([texts, loaded]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [["hi", "hi"], []]

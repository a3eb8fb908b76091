"""The embedded tiny model is the same on every machine and in every process."""

from __future__ import annotations

import zlib

from services.worker.engine.tiny import TINY_MODEL_CONFIG, tiny_hf_tensors
from services.worker.engine.weights import hf_names

# crc32 of the float32 bytes, recorded once: every machine and process must reproduce them.
EXPECTED_CRC32 = {
    "model.embed_tokens.weight": 3450240829,
    "model.layers.3.mlp.down_proj.weight": 744769602,
    "lm_head.weight": 3778147359,
}


def test_weights_are_bit_identical_to_the_recorded_ones():
    tensors = tiny_hf_tensors(list(EXPECTED_CRC32))
    assert {name: zlib.crc32(t.numpy().tobytes()) for name, t in tensors.items()} == EXPECTED_CRC32


def test_a_layer_range_is_generated_alone_identically():
    names = hf_names(TINY_MODEL_CONFIG, 0, 4)
    assert len(names) == 2 + 4 * 9 + 1  # embed, norm, lm_head... 9 tensors per layer
    alone = tiny_hf_tensors(["model.layers.2.mlp.up_proj.weight"])
    together = tiny_hf_tensors(names)
    assert alone["model.layers.2.mlp.up_proj.weight"].equal(
        together["model.layers.2.mlp.up_proj.weight"]
    )
    assert together["model.layers.2.mlp.up_proj.weight"].shape == (768, 256)
    assert not together["model.layers.1.mlp.up_proj.weight"].equal(
        together["model.layers.2.mlp.up_proj.weight"]
    )

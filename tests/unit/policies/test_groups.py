"""services.policies.groups: layer splits of KunServe groups."""

from __future__ import annotations

import pytest

from services.policies.groups import split_layers


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "expected"),
    [
        (4, 1, [(0, 4)]),
        (4, 2, [(0, 2), (2, 4)]),
        (4, 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
        (5, 2, [(0, 3), (3, 5)]),
        (32, 4, [(0, 8), (8, 16), (16, 24), (24, 32)]),
    ],
)
def test_split_layers(num_layers, num_stages, expected):
    assert split_layers(num_layers, num_stages) == expected


@pytest.mark.parametrize(("num_layers", "num_stages"), [(4, 0), (2, 3)])
def test_split_layers_rejects_impossible_splits(num_layers, num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        split_layers(num_layers, num_stages)

"""KunServe group plans: which member of a group keeps which layers.

    g = 4, L = 10 layers                   stage:  0      1      2      3
    split_layers(10, 4) -> layers kept:          [0,3)  [3,6)  [6,8)  [8,10)

The first L mod g stages keep one layer more. Stage 0 also keeps the embedding and the
last stage the final norm and the LM head, so with an even split those two hold a
little more than the rest; a group's pool is as large as its fullest member allows.

With weight share w (weights / memory of one member) the pool holds
`capacity_gain(g, w)` = (g - w) / (g (1 - w)) times what the g members hold alone.
"""

from __future__ import annotations


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[layer_start, layer_end) of each stage, contiguous, covering [0, num_layers)."""
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1")
    if num_layers < num_stages:
        raise ValueError(
            f"num_stages={num_stages} exceeds num_layers={num_layers}: every stage keeps a layer"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def capacity_gain(num_stages: int, weight_share: float) -> float:
    """KV capacity of a group over that of its members alone: (g - w) / (g (1 - w))."""
    g, w = num_stages, weight_share
    return (g - w) / (g * (1 - w))

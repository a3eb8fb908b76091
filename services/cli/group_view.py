"""How the CLI shows a KunServe group (`llmesh drop`, `llmesh status`): JSON and text.

A group's KV block holds only each member's layers, so its blocks and the members'
blocks before the drop (of all layers) compare as tokens: blocks x block size.
"""

from __future__ import annotations

from services.common.groups import GroupSpec


def group_to_json(group: GroupSpec) -> dict:
    return {
        "group_id": group.group_id,
        "status": group.status.value,
        "members": [
            {
                "instance_id": m.instance_id,
                "address": m.address,
                "stage": m.stage,
                "layer_start": m.layer_start,
                "layer_end": m.layer_end,
            }
            for m in group.members
        ],
        "num_group_blocks": group.num_group_blocks,
        "num_blocks_before": group.num_blocks_before,
        "block_size": group.block_size,
        "freed_weight_bytes": group.freed_weight_bytes,
    }


def layer_range(start: int, end: int) -> str:
    return f"[{start}, {end})"


def stages_text(group: GroupSpec) -> str:
    """`b[0,2) a[2,4)`: members in stage order with the layers each keeps."""
    return " ".join(f"{m.instance_id}[{m.layer_start},{m.layer_end})" for m in group.members)


def capacity_text(group: GroupSpec) -> str:
    """`330 blocks (5280 tokens) as a group vs 200 (3200 tokens) before, 1.65x`."""
    after = group.num_group_blocks * group.block_size
    text = f"{group.num_group_blocks} blocks ({after} tokens) as a group"
    if group.num_blocks_before:
        before = group.num_blocks_before * group.block_size
        text += (
            f" vs {group.num_blocks_before} ({before} tokens) before, "
            f"{group.num_group_blocks / group.num_blocks_before:.2f}x"
        )
    return text


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def describe_group(group: GroupSpec) -> list[str]:
    """Lines for a terminal: the members, then the capacity and the freed weights."""
    lines = [f"{group.group_id}: {group.status.value}, {group.num_stages} stages"]
    width = max(len(m.instance_id) for m in group.members)
    for m in group.members:
        lines.append(
            f"  stage {m.stage}  {m.instance_id:<{width}}  layers "
            f"{layer_range(m.layer_start, m.layer_end)}  {m.address}"
        )
    lines.append(f"  KV: {capacity_text(group)}")
    lines.append(f"  weights freed: {mib(group.freed_weight_bytes)}")
    return lines


def render_groups(groups: list[GroupSpec]):
    """A rich Table of the groups."""
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title="KunServe groups",
        title_justify="left",
    )
    for column in ("group", "status", r"stages: instance\[layers)", "KV", "freed"):
        table.add_column(column, justify="right" if column == "freed" else "left", no_wrap=True)
    for g in groups:
        table.add_row(
            g.group_id, g.status.value, stages_text(g), capacity_text(g), mib(g.freed_weight_bytes)
        )
    return table

"""Hypothesis strategies that build any protobuf message from its descriptor.

Nothing here knows llmesh's messages: `messages(descriptor)` walks the fields (every
scalar type, nested messages, repeated fields, maps, enums including values the enum
does not define, oneofs, proto3 `optional`), so an RPC added later is fuzzed without a
line of test code. Values lean toward the edges that break servers (0, -1, the type's
extremes, NaN and infinities, empty / very long / non-ASCII strings). `mutated(seed)`
starts from a valid request and rewrites a few fields, so most cases get past the
first validation and reach the code behind it.

`malformed_bytes(descriptor)` gives wire-level garbage a typed message cannot hold:
random bytes, a valid encoding cut short, a field sent with the wrong wire type, a
string field that is not UTF-8, a length prefix longer than the message.
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 3
MAX_REPEATED = 6

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _integers(cpp_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[cpp_type]
    edges = sorted(
        {
            v
            for v in (0, 1, 2, 3, -1, 7, 16, 64, 1024, low, high, low + 1, high - 1)
            if low <= v <= high
        }
    )
    return st.one_of(
        st.sampled_from(edges),
        st.integers(-4, 40).filter(lambda v: low <= v),
        st.integers(low, high),
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


def _strings() -> st.SearchStrategy[str]:
    edges = [
        "",
        " ",
        "a",
        "req-1",
        "tiny",
        "127.0.0.1:1",
        "\x00",
        "é☃😀",
        "../../etc/passwd",
        "x" * 4096,
        "☃" * 3000,
        "-1",
        "NaN",
        "\ud7ff\U0010ffff",
        "a\nb\rc",
    ]
    return st.one_of(st.sampled_from(edges), st.text(max_size=40))


def _bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from([b"", b"\x00", b"\xff" * 64]), st.binary(max_size=64))


def _enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    defined = [v.number for v in field.enum_type.values]
    # proto3 enums are open: an undefined number travels and must be refused cleanly.
    return st.one_of(st.sampled_from(defined), st.sampled_from([-1, max(defined) + 1, 2**31 - 1]))


def scalar_values(field: FieldDescriptor) -> st.SearchStrategy:
    """Values for one (non-repeated, non-message) field of any scalar type."""
    cpp = field.cpp_type
    if cpp in _INT_RANGES:
        return _integers(cpp)
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return _floats(64)
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return _floats(32)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_values(field)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes()
    return _strings()


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@st.composite
def _fill_field(draw, message: Message, field: FieldDescriptor, depth: int) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        entries = draw(
            st.dictionaries(
                scalar_values(key_field), scalar_values(value_field), max_size=MAX_REPEATED
            )
        )
        target.clear()
        target.update(entries)
        return
    if field.is_repeated:
        del target[:]
        if field.message_type is not None:
            for _ in range(draw(st.integers(0, MAX_REPEATED if depth < MAX_DEPTH else 0))):
                target.add().CopyFrom(draw(messages(field.message_type, depth + 1)))
        else:
            values = scalar_values(field)
            size = draw(st.one_of(st.integers(0, MAX_REPEATED), st.sampled_from([0, 200])))
            target.extend(draw(st.lists(values, min_size=size, max_size=size)))
        return
    if field.message_type is not None:
        if depth < MAX_DEPTH:
            target.CopyFrom(draw(messages(field.message_type, depth + 1)))
        else:
            target.SetInParent()
        return
    setattr(message, field.name, draw(scalar_values(field)))


def _settable_fields(descriptor: Descriptor, draw) -> list[FieldDescriptor]:
    """Each real oneof contributes at most one member; other fields stand alone."""
    chosen = []
    seen_oneofs = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is None or len(oneof.fields) == 1:  # proto3 `optional` is a 1-field oneof
            chosen.append(field)
        elif oneof.name not in seen_oneofs:
            seen_oneofs.add(oneof.name)
            member = draw(st.sampled_from([None, *oneof.fields]))
            if member is not None:
                chosen.append(member)
    return chosen


@st.composite
def messages(draw, descriptor: Descriptor, depth: int = 0) -> Message:
    """An arbitrary message of `descriptor`'s type: each field set or left unset."""
    message = _message_class(descriptor)()
    for field in _settable_fields(descriptor, draw):
        if draw(st.booleans()):
            draw(_fill_field(message, field, depth))
    return message


@st.composite
def mutated(draw, seed: Message) -> Message:
    """`seed` (a valid request) with 1 to 3 fields, possibly nested, rewritten or cleared."""
    message = type(seed)()
    message.CopyFrom(seed)
    for _ in range(draw(st.integers(1, 3))):
        target = message
        descriptor = message.DESCRIPTOR
        # Walk into a set sub-message now and then, so nested fields get mutated too.
        while True:
            fields = list(descriptor.fields)
            if not fields:
                break
            field = draw(st.sampled_from(fields))
            nested = (
                field.message_type is not None
                and not field.is_repeated
                and not _is_map(field)
                and target.HasField(field.name)
            )
            if nested and draw(st.booleans()):
                target = getattr(target, field.name)
                descriptor = field.message_type
                continue
            if draw(st.integers(0, 4)) == 0:
                target.ClearField(field.name)
            else:
                draw(_fill_field(target, field, 1))
            break
    return message


def requests(seeds: list[Message], descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Mostly-valid requests (mutated seeds, or a seed as is) plus arbitrary ones, 3:1:1."""
    if not seeds:
        return messages(descriptor)
    seed = st.sampled_from(seeds)
    return st.one_of(
        seed.flatmap(mutated),
        seed.flatmap(mutated),
        seed.flatmap(mutated),
        seed,
        messages(descriptor),
    )


# -- wire-level garbage ---------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


_WIRE_TYPE = {
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}


@st.composite
def malformed_bytes(draw, descriptor: Descriptor, seeds: list[Message]) -> bytes:
    """Bytes that are not a valid encoding of `descriptor` (or barely are)."""
    kind = draw(
        st.sampled_from(
            ["random", "truncated", "wrong_wire_type", "bad_utf8", "long_length", "deep_nesting"]
        )
    )
    valid = draw(requests(seeds, descriptor)).SerializeToString()
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=256))
    if kind == "truncated" and len(valid) > 1:
        return valid[: draw(st.integers(1, len(valid) - 1))]
    fields = list(descriptor.fields) or [None]
    field = draw(st.sampled_from(fields))
    number = field.number if field is not None else draw(st.integers(1, 2**29 - 1))
    if kind == "wrong_wire_type":
        expected = _WIRE_TYPE.get(field.type, 0) if field is not None else 0
        wire_type = draw(st.sampled_from([t for t in (0, 1, 2, 5) if t != expected]))
        payload = {0: _varint(2**63), 1: b"\x01" * 8, 2: _varint(3) + b"abc", 5: b"\x01" * 4}
        return valid + _tag(number, wire_type) + payload[wire_type]
    if kind == "bad_utf8":
        strings = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
        number = draw(st.sampled_from(strings)).number if strings else number
        return valid + _tag(number, 2) + _varint(3) + b"\xff\xfe\xc0"
    if kind == "long_length":
        return valid + _tag(number, 2) + _varint(draw(st.integers(10, 2**32))) + b"x"
    # deep_nesting: a field of the first message type, nested far past any sane depth.
    nested = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    number = nested[0].number if nested else number
    blob = b""
    for _ in range(draw(st.integers(50, 200))):
        blob = _tag(number, 2) + _varint(len(blob)) + blob
    return blob


def _message_class(descriptor: Descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)

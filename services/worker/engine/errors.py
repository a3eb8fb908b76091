"""Errors the engine raises.

`EngineInputError` (a `ValueError`) covers everything a caller can get wrong about a
request: servicers map it to INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION.
The other errors are about engine resources or internal invariants.
"""

from __future__ import annotations


class EngineInputError(ValueError):
    """Base class for bad input to the engine (never an engine bug)."""


class EmptyPromptError(EngineInputError):
    """The prompt has no tokens."""


class PromptTooLongError(EngineInputError):
    """The prompt does not fit the model context (or the whole KV pool)."""


class InvalidTokenError(EngineInputError):
    """A prompt token id is not an int in [0, vocab_size)."""


class InvalidSamplingParamsError(EngineInputError):
    """A SamplingParams field has an invalid value; the message names the field."""


class InvalidRequestIdError(EngineInputError):
    """The request id is not a non-empty str."""


class DuplicateRequestError(EngineInputError):
    """A request with this id is already in the engine."""


class UnknownRequestError(EngineInputError):
    """No request with this id is in the engine."""


class InvalidRequestStateError(EngineInputError):
    """The request exists but is in the wrong state for the call (e.g. suspend a waiting one)."""


class InvalidBlocksError(EngineInputError):
    """Block ids passed in are out of range, duplicated, not reserved, or in use where
    they must be free."""


class InvalidLayerRangeError(EngineInputError):
    """A layer range or split is not valid, or names layers this engine does not hold."""


class GroupCapacityError(EngineInputError):
    """A KunServe group's block pool cannot take its members' blocks (their ids would
    collide), or is more than a member can hold once it keeps its layers only."""


class InvalidMicroBatchError(EngineInputError):
    """Micro-batch limits are not ints > 0, or a micro-batch applied is not in flight
    (or comes with the wrong number of sampled tokens)."""


class NoFreeBlocksError(RuntimeError):
    """Not enough free KV blocks for a reservation or an allocation."""


class BlockIntegrityError(AssertionError):
    """The block manager's books do not balance (an engine bug, never user input)."""


class EngineStateError(RuntimeError):
    """The engine cannot do this now (e.g. step() while it holds only a layer range)."""


class KernelArgumentError(ValueError):
    """A tensor handed to a native kernel is not what the C code reads (shape, dtype,
    layout, range). Raised before the call, so the kernel never reads past a buffer;
    an engine bug or a misuse of native.py, never request input."""

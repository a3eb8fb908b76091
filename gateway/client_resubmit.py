"""Re-submission in the client SDK: a stream that a resume finds nowhere starts again.

A resume (Gateway.Resume) finds nothing when the request's gateway died and no worker
holds it any more: it was never placed, or its worker died with its gateway, so no
gateway has its prompt. The client still has it. Sampling is deterministic per request
(the engine draws from the request's seed and token index), so the same request with
the same seed produces the same tokens again: the SDK sends it once more (Generate,
same request id, the seed pinned to the one the first chunk reported) and skips the
tokens the caller already has, checking that each skipped token equals the one it
delivered. A difference means the new run is not the same generation: the stream
fails with DATA_LOSS rather than yield tokens that do not continue what the caller has.

    resubmission = Resubmission(request)          # the GenerateRequest as first sent
    resubmission.on_delivered(chunk)              # each chunk the caller got
    if resubmission.is_possible:                  # its seed is known
        request = resubmission.request_again()
        skip = resubmission.skipper()             # then, per chunk of the new stream:
        chunk = skip.feed(chunk)                  #   None while inside what was delivered
"""

from __future__ import annotations

import grpc

from protos import gateway_pb2


class PrefixMismatch(Exception):
    """The re-submitted run differs from what the caller already has (DATA_LOSS)."""

    code = grpc.StatusCode.DATA_LOSS


class Resubmission:
    """The original request and what the caller already got from it."""

    def __init__(
        self,
        request: gateway_pb2.GenerateRequest,
        delivered_token_ids=(),
        delivered_text: str = "",
    ) -> None:
        self.request = gateway_pb2.GenerateRequest()
        self.request.CopyFrom(request)
        self.delivered: list[int] = list(delivered_token_ids)
        self.delivered_text = delivered_text
        self.count = 0  # how often the request was sent again

    def on_delivered(self, chunk) -> None:
        """A chunk (client.Chunk) the caller gets: its tokens, text and (first chunk)
        the seed the gateway chose, unless the request named one."""
        if chunk.seed is not None and not self.request.sampling.HasField("seed"):
            self.request.sampling.seed = chunk.seed
        del self.delivered[chunk.first_token_index :]
        self.delivered.extend(chunk.token_ids)
        self.delivered_text += chunk.text

    @property
    def is_possible(self) -> bool:
        """False while its seed is unknown (no chunk yet and none given: another run
        could sample other tokens)."""
        return self.request.sampling.HasField("seed")

    def request_again(self) -> gateway_pb2.GenerateRequest:
        """The request to send again (is_possible must be true)."""
        self.count += 1
        return self.request

    def skipper(self) -> PrefixSkip:
        return PrefixSkip(self.request.request_id, self.delivered, self.delivered_text)


class PrefixSkip:
    """Turns a re-submitted stream (from token 0) into the rest of the caller's stream."""

    def __init__(self, request_id: str, delivered: list[int], delivered_text: str) -> None:
        self.request_id = request_id
        self.delivered = list(delivered)
        self.delivered_text = delivered_text
        self.text = ""  # the new run's text so far
        self.is_through = not delivered and not delivered_text

    def feed(self, chunk):
        """The chunk as the caller sees it (first_token_index and text from where it
        stands), or None while the new run is still inside what it has. Raises
        PrefixMismatch when a token (or the text) differs from what was delivered."""
        if self.is_through:
            return chunk
        start, tokens = chunk.first_token_index, chunk.token_ids
        have = self.delivered[start : start + len(tokens)]
        for offset, (got, was) in enumerate(zip(tokens, have, strict=False)):
            if got != was:
                raise PrefixMismatch(
                    f"request {self.request_id!r} was sent again (a resume found it "
                    f"nowhere), but its token {start + offset} is {got} where the stream "
                    f"had delivered {was}: not the same generation"
                )
        self.text += chunk.text
        end = start + len(tokens)
        if end < len(self.delivered) or (end == len(self.delivered) and not chunk.finish_reason):
            return None  # all of it was delivered already
        self.is_through = True
        if not self.text.startswith(self.delivered_text):
            raise PrefixMismatch(
                f"request {self.request_id!r} was sent again, but its text does not "
                f"begin with the {len(self.delivered_text)} characters already delivered"
            )
        return chunk._replace(
            first_token_index=len(self.delivered),
            token_ids=tuple(tokens[len(self.delivered) - start :]),
            text=self.text[len(self.delivered_text) :],
            seed=None,
        )

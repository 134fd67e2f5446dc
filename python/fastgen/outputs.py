"""What the engine hands back: one RequestOutput per request, with one CompletionOutput per sample
(SamplingParams.n of them), in vLLM's shape.

The engine emits a RequestOutput for a request after every step that advanced it; each carries
every sample's text and tokens so far, and `delta`, the text new since the request's previous
output (what a stream sends). The last one has `finished` set; LLM.generate returns only those.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Per position {token_id: logprob}: the n most likely tokens first (descending), then the
# sampled (or, for a prompt, the actual) token if it is not among them.
Logprobs = dict[int, float]


class FinishReason(enum.Enum):
    STOP = "stop"      # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full
    ABORT = "abort"    # cancelled by the caller (a client that went away)


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int                          # 0 .. n - 1
    text: str                           # output text so far (final once finished)
    token_ids: list[int]                # output token ids so far, EOS / stop token included
    finish_reason: FinishReason | None
    # With SamplingParams.logprobs: one entry per output token (see Logprobs); else None.
    logprobs: list[Logprobs] | None = None
    delta: str = ""                     # text safe to stream since the previous output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step (or its result, once finished)."""

    request_id: int
    prompt: str | None                  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (it has
    # no context); filled once the whole prompt is prefilled. Else None.
    prompt_logprobs: list[Logprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    # Shortcuts to the first sample, for the common n == 1.

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[Logprobs] | None:
        return self.outputs[0].logprobs

    @property
    def delta(self) -> str:
        return self.outputs[0].delta

"""What the engine hands back: one RequestOutput per request, with one CompletionOutput per sample
(SamplingParams.n of them), in vLLM's shape.

When and what the engine emits is chosen per request (RequestOutputKind, as vLLM's): CUMULATIVE
(the default), an output after every step that advanced the request, each with every sample's
text and tokens so far; DELTA, the same outputs holding only what is new since the previous one
(what a stream sends, and what a server times); FINAL_ONLY, one output once the request has
finished (LLM.generate, fastgen-generate). Every output's `delta` is the text new since the
request's previous output; the last one has `finished` set. CUMULATIVE copies each sample's
token list (and logprobs) at every step, O(length) per step; DELTA costs O(new) and FINAL_ONLY
nothing until the end, which is why every caller inside fastgen names one of those two.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Per position {token_id: logprob}: the n most likely tokens first (descending), then the
# sampled (or, for a prompt, the actual) token if it is not among them.
Logprobs = dict[int, float]


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every step that advanced it: everything so far
    DELTA = "delta"            # every step that advanced it: what is new since the last output
    FINAL_ONLY = "final_only"  # once, when finished: everything


class FinishReason(enum.Enum):
    STOP = "stop"      # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full
    ABORT = "abort"    # cancelled by the caller (a client that went away)


@dataclass
class CompletionOutput:
    """One sample of a request. In a DELTA output, text, token_ids and logprobs hold only what is
    new since the request's previous output (text is then the same as delta)."""

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

    @classmethod
    def accumulate(cls, first: RequestOutput) -> RequestOutput:
        """A new output holding a request's first DELTA output, to add() the later ones to; it
        shares no list with `first`."""
        return cls(first.request_id, first.prompt, first.prompt_token_ids, [],
                   first.prompt_logprobs).add(first)

    def add(self, later: RequestOutput) -> RequestOutput:
        """Appends a later DELTA output of the same request to this one, in place, and returns
        it: added up from the first (see accumulate), a request's DELTA outputs give what its
        FINAL_ONLY output holds. Costs O(what is new), but for the text, which is copied."""
        samples = {sample.index: sample for sample in self.outputs}
        for new in later.outputs:
            sample = samples.get(new.index)
            if sample is None:
                self.outputs.append(CompletionOutput(
                    new.index, new.text, list(new.token_ids), new.finish_reason,
                    None if new.logprobs is None else list(new.logprobs), new.delta))
                continue
            sample.text += new.text
            sample.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                sample.logprobs.extend(new.logprobs)
            sample.finish_reason = new.finish_reason
            sample.delta = new.delta
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        return self

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

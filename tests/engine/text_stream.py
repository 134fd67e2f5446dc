"""One sequence's tokens through the engine's two stop checks, without the engine: the
scheduler's token-level stop_reason (stop ids, EOS, max_tokens) and the detokenizer's text and
stop strings, combined in the order LLMEngine applies them (a stop string before max_tokens)."""

from __future__ import annotations

from fastgen.config import SamplingParams
from fastgen.engine.detokenizer import IncrementalDetokenizer
from fastgen.engine.scheduler import stop_reason
from fastgen.engine.sequence import FinishReason, Sequence


class TextStream:
    """append(token) -> why the sequence stops (None: go on); text, pop_delta(), finish_reason
    as the engine's outputs show them."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], decode=None):
        self.seq = Sequence(0, prompt_token_ids, params, params.max_tokens,
                            eos_token_ids=tuple(eos_token_ids))
        self.detokenizer = IncrementalDetokenizer(tokenizer, len(prompt_token_ids), params.stop,
                                                  decode)
        self.finish_reason: FinishReason | None = None

    @property
    def text(self) -> str:
        return self.detokenizer.text

    def pop_delta(self) -> str:
        return self.detokenizer.pop_delta()

    def append(self, token: int) -> FinishReason | None:
        if self.finish_reason is not None:
            raise RuntimeError("token appended to a finished request")
        self.seq.append_token(token)
        reason = stop_reason(self.seq, token)
        if self.detokenizer.step(self.seq.token_ids, reason is FinishReason.STOP,
                                 reason is not None):
            reason = FinishReason.STOP
        self.finish_reason = reason
        return reason

    def finish(self, reason: FinishReason) -> None:
        """Ends the sequence from outside (a full context, an abort)."""
        self.finish_reason = reason
        self.detokenizer.finish(self.seq.token_ids)

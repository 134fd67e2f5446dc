"""One request as the engine tracks it: its tokens, where its keys and values live in the paged
cache, and whether it waits, runs or has finished.

Prompt and output tokens are kept in one list (`token_ids`) because the model runner reads the
whole sequence (prefill, recompute after preemption) and the last token (decode) from it; the
output is the tail past `num_prompt_tokens`.
"""

from __future__ import annotations

import enum

from fastgen.config import SamplingParams
from fastgen.outputs import FinishReason, Logprobs

__all__ = ["FinishReason", "Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued for prefill (new, or preempted and to be recomputed)
    RUNNING = "running"    # holds cache blocks; prefills (in chunks), then decodes a token a step
    FINISHED = "finished"  # done; its blocks are back in the pool


class Sequence:
    """A prompt and its generated continuation.

    block_table[i] is the cache block holding tokens i * block_size .. (i + 1) * block_size - 1.
    num_cached_tokens of the tokens have their keys and values written in those blocks (the
    scheduler counts a step's tokens in once the step's output is applied). A step feeds some
    tokens after them (a prompt chunk, or the last sampled token while decoding); a token is
    sampled only by a step that reaches the end of the sequence. Generation stops at a token of
    stop_token_ids (EOS unless ignore_eos, and the request's stop ids) or after max_tokens.
    block_hashes[i] names the tokens of full block i and all before it (the block manager's
    prefix cache fills it in as blocks fill; the tokens only grow, so it stays valid)."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, index: int = 0, eos_token_ids: tuple[int, ...] = ()):
        if not prompt_token_ids:
            raise ValueError("a prompt needs at least one token")
        self.seq_id = seq_id
        self.index = index  # which of its request's n samples
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens, capped to the room left in the context
        # The seed of its own random stream (sample i of a seeded request: seed + i), else None.
        self.seed = None if params.seed is None else params.seed + index
        self.stop_token_ids = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else eos_token_ids)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Per output token {token_id: logprob} (see sampler.top_logprobs); None unless asked.
        self.output_logprobs: list[Logprobs] | None = (
            [] if params.logprobs is not None else None)
        # Per prompt token from the second on, filled chunk by chunk (see prompt_logprobs).
        self.prompt_logprobs: list[Logprobs] | None = (
            [] if params.prompt_logprobs is not None else None)
        # With structured outputs: its grammar's matcher, advanced by each sampled token
        # (engine/structured_output.py); else None.
        self.grammar = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Whether its prompt (or, after preemption, prompt and output) is not all cached yet:
        the next step feeds a chunk of it rather than one decode token."""
        return (self.num_cached_tokens < len(self.token_ids) - 1
                or len(self.token_ids) == self.num_prompt_tokens)

    def append_token(self, token_id: int, logprobs: Logprobs | None = None) -> None:
        self.token_ids.append(token_id)
        if self.output_logprobs is not None and logprobs is not None:
            self.output_logprobs.append(logprobs)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
                f"cached={self.num_cached_tokens}, blocks={self.block_table})")

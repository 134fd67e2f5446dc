"""One request as the engine tracks it: its tokens, where its keys and values live in the paged
cache, and whether it waits, runs or has finished.

Prompt and output tokens are kept in one list (`token_ids`) because the model runner reads the
whole sequence (prefill, recompute after preemption) and the last token (decode) from it; the
output is the tail past `num_prompt_tokens`.
"""

from __future__ import annotations

import enum

import torch

from fastgen.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued for prefill (new, or preempted and to be recomputed)
    RUNNING = "running"    # holds cache blocks and decodes one token per step
    FINISHED = "finished"  # done; its blocks are back in the pool


class FinishReason(enum.Enum):
    STOP = "stop"      # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens, or the model's context is full


class Sequence:
    """A prompt and its generated continuation.

    block_table[i] is the cache block holding tokens i * block_size .. (i + 1) * block_size - 1.
    num_cached_tokens of the tokens have their keys and values written in those blocks.
    block_hashes[i] names the tokens of full block i and all before it (the block manager's
    prefix cache fills it in as blocks fill; the tokens only grow, so it stays valid)."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, generator: torch.Generator | None = None):
        if not prompt_token_ids:
            raise ValueError("a prompt needs at least one token")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens, capped to the room left in the context
        self.generator = generator    # the request's own random stream when it has a seed
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Per output token {token_id: logprob} (see sampler.top_logprobs); None unless asked.
        self.output_logprobs: list[dict[int, float]] | None = (
            [] if params.logprobs is not None else None)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if self.output_logprobs is not None and logprobs is not None:
            self.output_logprobs.append(logprobs)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
                f"cached={self.num_cached_tokens}, blocks={self.block_table})")

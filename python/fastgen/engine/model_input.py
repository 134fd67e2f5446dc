"""What one engine step hands the model runner, and what it gets back: plain values, no engine
objects, so the same ModelInput can be pickled or broadcast to the worker processes of a
tensor-parallel group, which run the forward pass only.

The scheduler decides a step (a ScheduledBatch: which sequences feed how many tokens);
build_model_input flattens it into a ModelInput (token ids, positions, cache slots, block tables,
and which rows sample with which parameters); the runner returns a ModelOutput (sampled tokens,
logprobs); the scheduler applies it to the sequences. Fields are lists of ints, built in one pass
over the batch, because the runner turns each into one tensor and the CUDA graphs stage them into
static buffers as they are.

Shape letters: T tokens fed this step, B sequences in the batch, R rows that sample, P rows whose
prompt logprobs are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastgen.config import SamplingParams
from fastgen.engine.sampler import TokenHistory
from fastgen.engine.sequence import Sequence
from fastgen.outputs import Logprobs


@dataclass(frozen=True)
class NewlineAfterColon:
    """Megatron's prevent_newline_after_colon for one tokenizer: after any token whose text ends
    with ":", none whose text starts with a newline."""

    colon_ids: frozenset[int]
    newline_ids: list[int]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> NewlineAfterColon:
        from fastgen.tokenization import TokenText

        text = TokenText(tokenizer)
        ids = range(min(vocab_size, len(tokenizer)))
        token_bytes = [text.bytes(i) for i in ids]
        return cls(frozenset(i for i in ids if token_bytes[i].endswith(b":")),
                   [i for i in ids if token_bytes[i].startswith((b"\n", b"\r\n"))])

    def banned_after(self, token_id: int) -> list[int]:
        return self.newline_ids if token_id in self.colon_ids else []


@dataclass(frozen=True)
class SamplingRows:
    """The sequences that sample a token this step (those whose fed tokens reach their end),
    column by column."""

    rows: list[int]                # [R] index of each one in the batch
    seq_ids: list[int]             # [R] (a seeded sequence's random stream is kept by its id)
    params: list[SamplingParams]   # [R]
    seeds: list[int | None]        # [R] the seed of its own random stream, else None
    histories: list[TokenHistory] | None = None  # [R] prompt and output so far, for penalties
    # [R] each row's top_p this step, where some row's decays (SamplingParams.top_p_at)
    top_p: list[float | None] | None = None
    # [R] token ids a row may not sample this step (prevent_newline_after_colon), where some has
    banned: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class PromptLogprobsRow:
    """Sequence `row` of the batch scores prompt positions start .. start + len(targets) - 1:
    position p predicts prompt token p + 1 (targets)."""

    row: int
    start: int
    targets: list[int]
    num_logprobs: int


@dataclass(frozen=True)
class ModelInput:
    """One forward pass: sequence b feeds query_lens[b] tokens (cu_seqlens_q[b] ..
    cu_seqlens_q[b+1] of input_ids) and has seq_lens[b] tokens cached once they are written.
    block_tables[b] lists its cache blocks in order (the sequence's own list, read during the
    step: a copy travels when the input is pickled). finished_seq_ids are sequences gone since
    the previous step, whose sampling state the runner drops."""

    input_ids: list[int]           # [T]
    positions: list[int]           # [T]
    slot_mapping: list[int]        # [T] block * block_size + offset
    cu_seqlens_q: list[int]        # [B + 1]
    seq_lens: list[int]            # [B]
    block_tables: list[list[int]]  # [B][blocks of sequence b]
    max_seqlen_q: int              # the most tokens one sequence feeds
    sampling: SamplingRows
    prompt_logprobs: list[PromptLogprobsRow] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds one token, its last, and samples from its logits: nothing but
        one logits row per sequence is needed (what a CUDA graph of the decode step computes)."""
        return (self.num_tokens == self.num_seqs == len(self.sampling)
                and not self.prompt_logprobs)


@dataclass(frozen=True)
class ModelOutput:
    """What a step produced, aligned with its ModelInput's rows."""

    sampled_token_ids: list[int]           # [R]
    logprobs: list[Logprobs | None]        # [R] when the row asked for them
    prompt_logprobs: list[list[Logprobs]]  # [P] one entry per scored position


def build_model_input(seqs: list[Sequence], num_scheduled: list[int], block_size: int,
                      finished_seq_ids: list[int] | None = None,
                      newline_after_colon: NewlineAfterColon | None = None) -> ModelInput:
    """Packs each sequence's next num_scheduled[b] tokens (after its cached ones) back to back.
    A sequence samples when they reach its end and it generates (max_tokens > 0).
    newline_after_colon: the tokenizer's colon and newline tokens, needed when a sequence has
    prevent_newline_after_colon."""
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu_seqlens_q = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    rows: list[int] = []
    prompt_rows: list[PromptLogprobsRow] = []
    for b, (seq, count) in enumerate(zip(seqs, num_scheduled)):
        start = seq.num_cached_tokens
        end = start + count
        table = seq.block_table
        token_ids = seq.token_ids
        if count == 1:  # decode: the common case, kept cheap
            input_ids.append(token_ids[start])
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)
        else:
            input_ids.extend(token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
        cu_seqlens_q.append(cu_seqlens_q[-1] + count)
        seq_lens.append(end)
        tables.append(table)
        if end == len(token_ids) and seq.max_tokens > 0:
            rows.append(b)
        if seq.prompt_logprobs is not None:
            # A recomputed prompt (after preemption) is not scored again.
            first = max(start, len(seq.prompt_logprobs))
            last = min(end, seq.num_prompt_tokens - 1)
            if last > first:
                prompt_rows.append(PromptLogprobsRow(b, first, token_ids[first + 1:last + 1],
                                                     seq.params.prompt_logprobs))
    sampling_seqs = [seqs[b] for b in rows]
    params = [s.params for s in sampling_seqs]
    histories = ([TokenHistory(s.token_ids, s.num_prompt_tokens) for s in sampling_seqs]
                 if any(p.has_penalties for p in params) else None)
    top_p = ([s.params.top_p_at(s.num_output_tokens) for s in sampling_seqs]
             if any(p.top_p_decay for p in params) else None)
    banned = None
    if any(p.prevent_newline_after_colon for p in params):
        if newline_after_colon is None:
            raise ValueError("prevent_newline_after_colon needs the tokenizer's token classes")
        banned = [newline_after_colon.banned_after(s.last_token_id)
                  if s.params.prevent_newline_after_colon else [] for s in sampling_seqs]
    sampling = SamplingRows(rows, [s.seq_id for s in sampling_seqs], params,
                            [s.seed for s in sampling_seqs], histories, top_p, banned)
    return ModelInput(input_ids, positions, slots, cu_seqlens_q, seq_lens, tables,
                      max(num_scheduled), sampling, prompt_rows, list(finished_seq_ids or ()))

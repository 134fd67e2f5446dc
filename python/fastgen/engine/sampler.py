"""Picks each sequence's next token from its logits, on the logits' device, for the whole batch at
once.

Repetition, presence and frequency penalties come first (SamplingParams gives the formulas), as
one scatter over the batch's token ids, built only for a batch where some row uses one so the
common path costs nothing more; then logit_bias (one scatter-add) and the structured-output masks
of the constrained rows (tokens their grammar does not allow next get -inf), likewise only where
some row has them. Greedy rows (temperature 0) then take the argmax. Sampled rows are
scaled by 1 / temperature, cut to their min-p, top-k and top-p (nucleus) sets, and drawn with the
exponential race:

    token = argmax_i  p_i / E_i,   E_i ~ Exp(1) independent

which picks i with probability p_i (the race's winner is the first of independent exponential
clocks with rates p_i). Each draw consumes exactly V exponentials from one generator (k of them
when every sampled row of the batch has a top_k: the draw is then made among each row's k
candidates, found with topk rather than a sort of the vocabulary): a seeded request's own
generator, so its tokens do not depend on its batch mates, or else the engine's.

Nothing here waits for the device except where values must come back to Python (top_logprobs):
per-row parameters go to the device through pinned memory (to_device), and the caller's one
.tolist() of the tokens is the step's only sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.config import SamplingParams
from fastgen.engine.structured_output import TokenMasks


@dataclass
class TokenHistory:
    """What a row's penalties look at: every token of its sequence so far, prompt first."""

    token_ids: list[int]
    num_prompt_tokens: int



def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest value, the first of equal ones. [B, V] -> [B] int64.
    max(dim).indices, not argmax: the same index (ties and NaN alike) at a third of argmax's
    time on a CPU (21 against 62 us for one 49,152-wide row, 160 against 490 for 16)."""
    return x.max(dim=-1).indices

class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)  # for requests without a seed
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        """The random stream of a request with a seed."""
        return torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 histories: list[TokenHistory] | None = None,
                 masks: TokenMasks | None = None, top_p: list[float | None] | None = None,
                 banned: list[list[int]] | None = None) -> torch.Tensor:
        """logits: [B, V] float32 -> [B] int64 token ids. histories (one per row) are needed
        only when some row has a penalty; masks: the constrained rows' allowed tokens; top_p:
        each row's this step (default: its params'); banned: token ids each row may not
        sample."""
        if any(p.has_penalties for p in params):
            if histories is None:
                raise ValueError("penalties need each row's token history")
            logits = apply_penalties(logits, params, histories)
        if any(p.has_logit_bias for p in params):
            logits = apply_logit_bias(logits, params)
        if banned is not None and any(banned):
            logits = apply_bans(logits, banned)
        if masks is not None and masks.rows:
            logits = apply_token_bitmask(logits, masks.rows, masks.bitmask())
        greedy = [p.temperature == 0 for p in params]
        if all(greedy):
            return argmax_rows(logits)
        temperatures = to_device([p.temperature or 1.0 for p in params], logits.dtype,
                                 logits.device)
        scaled = logits / temperatures[:, None]  # [B, V]
        if any(p.min_p is not None for p in params):
            scaled = apply_min_p(scaled, [p.min_p for p in params])
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params] if top_p is None else top_p
        sampled_k = [k for k, g in zip(top_k, greedy) if not g]
        if all(k is not None for k in sampled_k) and max(sampled_k) < logits.shape[-1]:
            # Every sampled row keeps at most K tokens: work on the K candidates alone (no sort
            # of the vocabulary, K exponentials per row instead of V). Greedy rows ride along
            # with k = 1 and are replaced below.
            ks = [1 if g else k for k, g in zip(top_k, greedy)]
            candidates, token_ids = scaled.topk(max(ks), dim=-1)  # [B, K] each, descending
            candidates = apply_top_k_top_p(candidates, ks, top_p, presorted=True)
            picked = self._race(candidates, greedy, generators, ks)  # [B] indices into K
            sampled = token_ids.gather(1, picked[:, None])[:, 0]
        else:
            if any(k is not None or p is not None for k, p in zip(top_k, top_p)):
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            sampled = self._race(scaled, greedy, generators)
        if any(greedy):
            is_greedy = to_device(greedy, torch.bool, logits.device)
            sampled = torch.where(is_greedy, argmax_rows(logits), sampled)
        return sampled

    def _race(self, scaled: torch.Tensor, greedy: list[bool],
              generators: list[torch.Generator | None],
              widths: list[int] | None = None) -> torch.Tensor:
        """One draw per row from softmax(scaled) by the exponential race; widths[row] columns of
        the row (default all) can win. [B, C] -> [B]"""
        probs = scaled.softmax(dim=-1)
        noise = self._exponential_noise(probs, greedy, generators, widths)
        return argmax_rows(probs / noise)

    def _exponential_noise(self, probs: torch.Tensor, greedy: list[bool],
                           generators: list[torch.Generator | None],
                           widths: list[int] | None = None) -> torch.Tensor:
        """Exp(1) draws, each row from its request's generator; 1 on greedy rows. A row draws
        widths[row] of them (its top_k; default all C), so what a seeded row draws never depends
        on its batch mates; its other columns hold 1 (their probability is 0).
        probs: [B, C] -> [B, C]"""
        noise = torch.empty_like(probs)  # [B, C]
        if widths is None and not any(greedy) and all(g is None for g in generators):
            noise.exponential_(generator=self.generator)
        else:
            if widths is not None:
                noise.fill_(1.0)
            for row, (is_greedy, gen) in enumerate(zip(greedy, generators)):
                if is_greedy:
                    noise[row] = 1.0  # the row takes the argmax of the raw logits instead
                else:
                    cells = noise[row] if widths is None else noise[row, :widths[row]]
                    cells.exponential_(generator=gen if gen is not None else self.generator)
        # An exact zero would make an excluded token's 0 / 0 a NaN, which argmax prefers.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int | None],
                      top_p: list[float | None], presorted: bool = False) -> torch.Tensor:
    """Sets to -inf every logit outside its row's k largest (top_k) and outside the smallest set of
    largest-probability tokens whose probabilities sum to at least p (top_p); None is off.
    Exactly k tokens survive top-k even with ties. presorted: each row is already in descending
    order (the top-k candidates), so no sort is needed. logits: [B, V] -> [B, V]"""
    vocab = logits.shape[-1]
    device = logits.device
    if presorted:
        sorted_logits, order = logits.clone(), None
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V] each
    if any(k is not None for k in top_k):
        ks = to_device([vocab if k is None else k for k in top_k], torch.int64, device)
        rank = torch.arange(vocab, device=device)
        sorted_logits.masked_fill_(rank[None, :] >= ks[:, None], float("-inf"))
    if any(p is not None for p in top_p):
        ps = to_device([1.0 if p is None else p for p in top_p], logits.dtype, device)
        has_p = to_device([p is not None for p in top_p], torch.bool, device)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]; 0 for the top token
        outside = (mass_before >= ps[:, None]) & has_p[:, None]
        sorted_logits.masked_fill_(outside, float("-inf"))
    if order is None:
        return sorted_logits
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: list[float | None]) -> torch.Tensor:
    """Sets to -inf every logit whose probability is below min_p times its row's largest
    probability; None is off. p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p), so no softmax
    is needed. logits: [B, V] -> [B, V]"""
    floors = to_device([math.log(p) if p else float("-inf") for p in min_p],  # None, 0: off
                       logits.dtype, logits.device)  # [B]
    cutoff = logits.amax(dim=-1) + floors  # [B]
    return logits.masked_fill(logits < cutoff[:, None], float("-inf"))


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[TokenHistory]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens, then presence and frequency penalties
    over the output tokens (formulas in SamplingParams), for the whole batch at once.
    logits: [B, V] -> [B, V] (a new tensor)"""
    batch, vocab = logits.shape
    device = logits.device
    # Pad ragged token lists with an extra column `vocab`, dropped after the scatter.
    prompt_ids = _padded([h.token_ids[:h.num_prompt_tokens] for h in histories], vocab, device)
    output_ids = _padded([h.token_ids[h.num_prompt_tokens:] for h in histories], vocab, device)
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]  # [B, V] times each token was generated
    in_prompt = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
    in_prompt.scatter_(1, prompt_ids, True)
    seen = in_prompt[:, :vocab] | (counts > 0)  # [B, V]

    def column(values: list[float]) -> torch.Tensor:  # [B, 1]
        return to_device(values, logits.dtype, device)[:, None]

    repetition = column([p.repetition_penalty for p in params])
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    presence = column([p.presence_penalty for p in params])
    frequency = column([p.frequency_penalty for p in params])
    return logits - presence * (counts > 0) - frequency * counts


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """z[row, t] + logit_bias[t] for each token id t a row's bias names (ids beyond the
    vocabulary are refused when the request is added). logits: [B, V] -> [B, V] (a new
    tensor)"""
    rows, token_ids, biases = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(row)
            token_ids.append(token_id)
            biases.append(bias)
    device = logits.device
    flat = (to_device(rows, torch.long, device) * logits.shape[-1]
            + to_device(token_ids, torch.long, device))  # [N] into logits.view(-1)
    out = logits.clone()
    out.view(-1).index_add_(0, flat, to_device(biases, logits.dtype, device))
    return out


def apply_bans(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """-inf at the token ids each row may not sample. logits: [B, V] -> [B, V] (a new tensor)"""
    rows = [row for row, ids in enumerate(banned) for _ in ids]
    token_ids = [t for ids in banned for t in ids]
    device = logits.device
    out = logits.clone()
    out[to_device(rows, torch.long, device), to_device(token_ids, torch.long, device)] = \
        float("-inf")
    return out


def apply_token_bitmask(logits: torch.Tensor, rows: list[int],
                        bitmask: torch.Tensor) -> torch.Tensor:
    """-inf for each token a row's bitmask does not allow: token t of rows[r] is allowed when
    bit t % 32 of bitmask[r, t // 32] is set. logits: [B, V], bitmask: [R, ceil(V / 32)] int32
    (CPU) -> [B, V] (a new tensor)"""
    batch, vocab = logits.shape
    device = logits.device
    bits = bitmask.to(device, non_blocking=True)  # [R, W]
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()  # [R, V]
    out = logits.clone()
    index = to_device(rows, torch.long, device)
    out[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return out


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged rows of token ids -> [B, max(1, longest)] int64, padded with pad."""
    width = max(1, max(len(r) for r in rows))
    return to_device([r + [pad] * (width - len(r)) for r in rows], torch.long, device)


def top_logprobs(logits: torch.Tensor, sampled: torch.Tensor,
                 wanted: list[int | None]) -> list[dict[int, float] | None]:
    """Per row asking for n = wanted[row] logprobs: {token_id: logprob} of the raw distribution
    log_softmax(logits), holding the n most likely tokens in descending order and then the
    sampled (or actual next prompt) token if it is not among them (so n or n + 1 entries); None
    for rows where wanted is None.
    logits: [B, V] (before penalties and temperature), sampled: [B] -> B entries"""
    rows = [row for row, n in enumerate(wanted) if n is not None]
    if not rows:
        return [None] * len(wanted)
    index = to_device(rows, torch.int64, logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)  # [R, V]
    top_values, top_ids = logprobs.topk(max(wanted[row] for row in rows), dim=-1)  # [R, N]
    sampled_values = logprobs.gather(1, sampled[index][:, None])[:, 0]  # [R]
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    sampled_ids, sampled_values = sampled[index].tolist(), sampled_values.tolist()
    out: list[dict[int, float] | None] = [None] * len(wanted)
    for r, row in enumerate(rows):
        n = wanted[row]
        entry = dict(zip(top_ids[r][:n], top_values[r][:n]))
        entry.setdefault(sampled_ids[r], sampled_values[r])
        out[row] = entry
    return out


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on device, without waiting for it: on CUDA through pinned
    memory and a non-blocking copy (torch.tensor(data, device="cuda") copies from pageable memory
    and then synchronizes the stream, stalling the host until the queued work is done)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

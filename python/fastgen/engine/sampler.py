"""Picks each sequence's next token from its logits, on the logits' device, for the whole batch at
once.

Greedy rows (temperature 0) take the argmax. Sampled rows are scaled by 1 / temperature, cut to
their top-k and top-p (nucleus) sets, and drawn with the exponential race:

    token = argmax_i  p_i / E_i,   E_i ~ Exp(1) independent

which picks i with probability p_i (the race's winner is the first of independent exponential
clocks with rates p_i). Each draw consumes exactly V exponentials from one generator: a seeded
request's own generator, so its tokens do not depend on its batch mates, or else the engine's.
"""

from __future__ import annotations

import torch

from fastgen.config import SamplingParams


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
                 generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits: [B, V] float32 -> [B] int64 token ids"""
        greedy = [p.temperature == 0 for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)
        temperatures = torch.tensor([p.temperature or 1.0 for p in params], dtype=logits.dtype,
                                    device=logits.device)
        scaled = logits / temperatures[:, None]  # [B, V]
        if any(p.top_k is not None or p.top_p is not None for p in params):
            scaled = apply_top_k_top_p(scaled, [p.top_k for p in params],
                                       [p.top_p for p in params])
        probs = scaled.softmax(dim=-1)
        noise = self._exponential_noise(probs, greedy, generators)
        sampled = (probs / noise).argmax(dim=-1)  # [B]
        if any(greedy):
            is_greedy = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
        return sampled

    def _exponential_noise(self, probs: torch.Tensor, greedy: list[bool],
                           generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) draws, each row from its request's generator; 1 on greedy rows.
        probs: [B, V] -> [B, V]"""
        noise = torch.empty_like(probs)  # [B, V]
        if not any(greedy) and all(g is None for g in generators):
            noise.exponential_(generator=self.generator)
        else:
            for row, (is_greedy, gen) in enumerate(zip(greedy, generators)):
                if is_greedy:
                    noise[row] = 1.0  # the row takes the argmax of the raw logits instead
                else:
                    noise[row].exponential_(generator=gen if gen is not None else self.generator)
        # An exact zero would make an excluded token's 0 / 0 a NaN, which argmax prefers.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int | None],
                      top_p: list[float | None]) -> torch.Tensor:
    """Sets to -inf every logit outside its row's k largest (top_k) and outside the smallest set of
    largest-probability tokens whose probabilities sum to at least p (top_p); None is off.
    Exactly k tokens survive top-k even with ties. logits: [B, V] -> [B, V]"""
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V] each
    if any(k is not None for k in top_k):
        ks = torch.tensor([vocab if k is None else k for k in top_k], device=device)
        rank = torch.arange(vocab, device=device)
        sorted_logits.masked_fill_(rank[None, :] >= ks[:, None], float("-inf"))
    if any(p is not None for p in top_p):
        ps = torch.tensor([1.0 if p is None else p for p in top_p], dtype=logits.dtype,
                          device=device)
        has_p = torch.tensor([p is not None for p in top_p], device=device)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]; 0 for the top token
        outside = (mass_before >= ps[:, None]) & has_p[:, None]
        sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)

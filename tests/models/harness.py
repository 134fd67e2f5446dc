"""Drives a fastgen model the way the engine does, without the engine: a paged KV cache and the
AttentionMetadata for a packed prefill of several prompts and for batched decode steps.

Each sequence owns a fixed run of cache blocks, handed out in a shuffled order so that the block
table's indirection is exercised. Shape letters: T tokens, B sequences, V vocabulary, N cache
blocks, S block size, M blocks per sequence, Hkv KV heads, D head size.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from fastgen.config import EngineConfig
from fastgen.layers.attention import (AttentionMetadata, ForwardBatch, allocate_kv_caches,
                                      kv_cache_specs)
from fastgen.loader import load_model
from fastgen.ops.tolerances import assert_logits_close


class PagedHarness:
    """Runs prefill and decode for up to max_seqs sequences of up to max_len tokens."""

    def __init__(self, model, max_seqs: int, max_len: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
        self.model, self.block_size, self.device = model, block_size, device
        blocks_per_seq = (max_len + block_size - 1) // block_size
        num_blocks = max_seqs * blocks_per_seq
        # each layer's cache as its spec says: [N, S, Hkv, D] keys and values for Llama
        self.kv_caches = allocate_kv_caches(kv_cache_specs(model, dtype), num_blocks, block_size,
                                            torch.device(device))
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.block_tables = order.view(max_seqs, blocks_per_seq).to(torch.int32)  # [B, M]
        self.seq_lens: list[int] = []

    def _slot(self, seq: int, position: int) -> int:
        block = int(self.block_tables[seq, position // self.block_size])
        return block * self.block_size + position % self.block_size

    def _run(self, tokens: list[int], positions: list[int], seqs: list[int],
             q_lens: list[int]) -> torch.Tensor:
        """One forward over the packed tokens -> logits [T, V] float32."""
        cu_seqlens = [0]
        for q_len in q_lens:
            cu_seqlens.append(cu_seqlens[-1] + q_len)
        k_lens = [self.seq_lens[s] for s in seqs]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([self._slot(s, p) for s, q_len, k_len in zip(seqs, q_lens, k_lens)
                                       for p in range(k_len - q_len, k_len)], device=self.device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
            seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=self.device),
            block_tables=self.block_tables[seqs].to(self.device),
            max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
        with torch.no_grad():
            hidden = self.model(torch.tensor(tokens, device=self.device),
                                torch.tensor(positions, device=self.device),
                                ForwardBatch(meta, self.kv_caches))  # [T, H]
            return self.model.compute_logits(hidden)  # [T, V]

    def prefill(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Starts one sequence per prompt, all in one packed forward -> per prompt [L_b, V]."""
        self.seq_lens = [len(p) for p in prompts]
        logits = self._run([t for p in prompts for t in p],
                           [i for p in prompts for i in range(len(p))],
                           list(range(len(prompts))), self.seq_lens)
        return list(logits.split(self.seq_lens))

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Appends one token to every sequence, in one batched forward -> [B, V]."""
        positions = list(self.seq_lens)
        self.seq_lens = [n + 1 for n in self.seq_lens]
        return self._run(tokens, positions, list(range(len(tokens))), [1] * len(tokens))


# Checking a model family against Hugging Face's implementation.

VOCAB = 384
DECODE_STEPS = 5
DEFAULT_PROMPT_LENGTHS = [13, 1, 29, 40]


def randomized(model):
    """model with every parameter drawn away from its init value: norm weights in [0.5, 1.5],
    embeddings and heads N(0, 0.1), the rest N(0, 0.05). Returns model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1 if "embed" in name or "lm_head" in name else 0.05)
    return model


def paged_logits(model, prompt: list[int], tokens: list[int], dtype=torch.float32) -> torch.Tensor:
    """fastgen's logits for a prefill of prompt and then one decode step per token of tokens
    but the last (the positions of hf_greedy's logits but its final one).   -> [L + steps - 1, V]"""
    harness = PagedHarness(model, max_seqs=1, max_len=len(prompt) + len(tokens), dtype=dtype)
    logits = [harness.prefill([prompt])[0]]
    for token in tokens[:-1]:
        logits.append(harness.decode([token]))
    return torch.cat(logits)


def save_tiny_model(hf_config, folder, prepare=None) -> None:
    """A random checkpoint with every parameter (biases and norm weights too) drawn away from its
    init value, saved as safetensors with a small word-level tokenizer. prepare(model), when
    given, may change the model (e.g. its buffers) before it is saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_config = copy.deepcopy(hf_config)
    hf_config.vocab_size = VOCAB
    hf_config.bos_token_id, hf_config.eos_token_id = 1, 2
    model = randomized(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32))
    with torch.no_grad():
        if prepare is not None:
            prepare(model)
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2").save_pretrained(folder)


def hf_greedy(hf_model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation and its logits at every position of prompt + continuation."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(torch.tensor([ids])).logits[0]
            ids.append(int(logits[-1].argmax()))
        logits = hf_model(torch.tensor([ids])).logits[0]  # [L + steps, V]
    return ids[len(prompt):], logits



def assert_matches_hugging_face(hf_config, folder, device: str = "cpu",
                                lengths: list[int] = DEFAULT_PROMPT_LENGTHS,
                                prepare=None) -> None:
    """fastgen's model of a tiny random checkpoint against transformers' on the same folder:
    logits of a packed prefill of prompts of these lengths and of batched decode steps fed with
    HF's greedy tokens within the float32 logit tolerance, and the same greedy tokens. prepare:
    as save_tiny_model's."""
    save_tiny_model(hf_config, folder, prepare)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    loaded = load_model(EngineConfig(model=str(folder), dtype="float32", device=device))
    assert loaded.eos_token_ids == [2]

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    expected = [hf_greedy(hf_model, p, DECODE_STEPS) for p in prompts]

    harness = PagedHarness(loaded.model, max_seqs=len(prompts),
                           max_len=max(lengths) + DECODE_STEPS, block_size=16, device=device)
    for prompt, logits, (greedy, hf_logits) in zip(prompts, harness.prefill(prompts), expected):
        assert_logits_close(logits.cpu(), hf_logits[:len(prompt)], torch.float32)
        assert int(logits[-1].argmax()) == greedy[0]
    for step in range(DECODE_STEPS - 1):
        logits = harness.decode([greedy[step] for greedy, _ in expected]).cpu()  # [B, V]
        for b, (prompt, (greedy, hf_logits)) in enumerate(zip(prompts, expected)):
            assert_logits_close(logits[b], hf_logits[len(prompt) + step], torch.float32)
            assert int(logits[b].argmax()) == greedy[step + 1]

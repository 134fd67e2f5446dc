"""The same requests answered by Hugging Face transformers: the baseline `fastgen-run --backend hf`
and the benchmarks compare against, and the reference the end-to-end tests hold fastgen to (as
Megatron's huggingface_reference.py does for its server).

Prompts run one at a time, so no padding changes their numerics. Sampling maps onto
`generate`: temperature 0 is greedy (do_sample=False); otherwise temperature, top_k, top_p and
min_p with the request's seed set before the call; repetition_penalty always. Presence and
frequency penalties and logprobs have no `generate` counterpart here and are not applied. EOS and stop_token_ids end generation inside `generate`;
stop strings are applied afterwards (the text is cut where the first one starts, the tokens after
the one that completed it are dropped). Output text is decoded without special tokens, and EOS /
stop tokens are kept in token_ids, as fastgen does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastgen.config import EngineConfig, SamplingParams, parse_dtype
from fastgen.outputs import CompletionOutput, FinishReason, RequestOutput
from fastgen.tokenization import render_chat


class HFBackend:
    def __init__(self, model_dir: str | Path, dtype: str = EngineConfig.dtype, device: str = "cpu",
                 eos_token_ids: list[int] | None = None, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else \
            AutoTokenizer.from_pretrained(model_dir)
        if eos_token_ids is None:
            eos = self.model.generation_config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = self.model.config.max_position_embeddings

    def generate(self, prompts: list[str], sampling_params: SamplingParams | list[SamplingParams],
                 chat: bool = False) -> list[RequestOutput]:
        """Each prompt completed (or, with chat, answered as a user message) in order."""
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            if chat:
                ids = render_chat(self.tokenizer, [{"role": "user", "content": prompt}])
            else:
                ids = self.tokenizer.encode(prompt)
            outputs.append(self.generate_ids(ids, params, prompt))
        return outputs

    @torch.inference_mode()
    def generate_ids(self, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: str | None = None) -> RequestOutput:
        from transformers import GenerationConfig

        room = self.max_model_len - len(prompt_token_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but the model's "
                             f"context is {self.max_model_len} tokens")
        max_tokens = min(params.max_tokens, room)
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_k=params.top_k if not params.greedy else None,  # None: off (HF's default is 50)
            top_p=params.top_p if not params.greedy else None,
            min_p=params.min_p if not params.greedy else None,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else (self.eos_token_ids[0] if self.eos_token_ids else 0),
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        ids = torch.tensor([prompt_token_ids], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  generation_config=config)
        token_ids = out[0, len(prompt_token_ids):].tolist()
        return self._finish(prompt, list(prompt_token_ids), token_ids, params, set(stop_ids),
                            max_tokens)

    def _finish(self, prompt: str | None, prompt_token_ids: list[int], token_ids: list[int],
                params: SamplingParams, stop_ids: set[int], max_tokens: int) -> RequestOutput:
        def result(text: str, ids: list[int], reason: FinishReason) -> RequestOutput:
            return RequestOutput(0, prompt, prompt_token_ids,
                                 [CompletionOutput(0, text, ids, reason)])

        for end, token in enumerate(token_ids, start=1):
            if token in stop_ids:
                return result(self._decode(token_ids[: end - 1]), token_ids[:end],
                              FinishReason.STOP)
            if params.stop:
                text = self._decode(token_ids[:end])
                hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
                if hits:
                    return result(text[: min(hits)], token_ids[:end], FinishReason.STOP)
        reason = FinishReason.LENGTH if len(token_ids) >= max_tokens else FinishReason.STOP
        return result(self._decode(token_ids), token_ids, reason)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

"""The offline API, shaped like vLLM's:

    from fastgen import LLM, SamplingParams
    llm = LLM("smollm2", dtype="bfloat16")
    outs = llm.generate(["The sky is"], SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].outputs[0].text)   # or outs[0].text: the first sample's
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}])[0].text)

All prompts of a call are queued at once and run with continuous batching; outputs come back one
per prompt, in order (a RequestOutput per prompt, with its n samples in `.outputs`). String prompts are tokenized with the tokenizer's special tokens (BOS);
chat conversations are rendered with its chat template (add_generation_prompt=True) and tokenized
without adding them again.
"""

from __future__ import annotations

from pathlib import Path

from fastgen.config import EngineConfig, LoadFormat, SamplingParams
from fastgen.engine.engine import LLMEngine
from fastgen.outputs import CompletionOutput, FinishReason, RequestOutput, RequestOutputKind
from fastgen.tokenization import Conversation, render_chat_prompt

__all__ = ["LLM", "RequestOutput", "CompletionOutput", "FinishReason"]


class LLM:
    def __init__(self, model: str = EngineConfig.model, dtype: str = EngineConfig.dtype,
                 device: str = EngineConfig.device,
                 load_format: str | LoadFormat = EngineConfig.load_format, **kwargs):
        """kwargs: any other engine setting, by its field name: EngineConfig's (max_model_len,
        max_num_seqs, seed, enforce_eager, ...), CacheConfig's (block_size, cpu_kv_cache_gib,
        gpu_memory_utilization, enable_prefix_caching) or ParallelConfig's
        (tensor_parallel_size, data_parallel_size; only 1 for now). enforce_eager=True turns
        decode-step graphs off (CUDA graphs, and step graphs on the CPU), for debugging."""
        try:
            config = EngineConfig.from_fields(model=model, dtype=dtype, device=device,
                                              load_format=load_format, **kwargs)
        except TypeError as e:
            raise TypeError(f"LLM() got {e}") from None
        self._start(config)

    @classmethod
    def from_engine_config(cls, config: EngineConfig) -> LLM:
        """The LLM of a config built beforehand (the CLIs': EngineConfig.from_cli_args)."""
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        config.torch_dtype  # noqa: B018  (raises ValueError on an unknown dtype before loading)
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.loaded.model

    @property
    def model_dir(self) -> Path:
        return self.engine.loaded.model_dir

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completes each prompt (text, or token ids) and returns their outputs in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(texts, token_ids, sampling_params, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answers one conversation (a list of {"role", "content"} messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        rendered = [render_chat_prompt(self.tokenizer, c) for c in conversations]
        return self._run([r.text for r in rendered], [r.token_ids for r in rendered],
                         sampling_params, use_tqdm)

    def _run(self, texts: list[str | None], token_ids: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(token_ids)
        if len(sampling_params) != len(token_ids):
            raise ValueError(f"{len(token_ids)} prompts but {len(sampling_params)} sampling params")
        engine = self.engine
        order: dict[int, int] = {}  # request id -> prompt index
        try:
            for index, (text, ids, params) in enumerate(zip(texts, token_ids, sampling_params)):
                try:
                    order[engine.add_request(ids, params, text,
                                             RequestOutputKind.FINAL_ONLY)] = index
                except ValueError as e:
                    raise ValueError(f"prompt {index}: {e}" if len(token_ids) > 1 else str(e)) \
                        from None
            results: list[RequestOutput | None] = [None] * len(token_ids)
            progress = _progress_bar(len(token_ids), use_tqdm)
            while engine.has_unfinished():
                for out in engine.step():  # only finished requests' outputs (FINAL_ONLY)
                    for sample in out.outputs:
                        sample.delta = ""  # everything is in .text
                    results[order.pop(out.request_id)] = out
                    if progress is not None:
                        progress.update(1)
            if progress is not None:
                progress.close()
            return results
        finally:
            for request_id in order:  # interrupted, or a later prompt was refused
                engine.abort_request(request_id)


def _progress_bar(total: int, use_tqdm: bool):
    # Only worth drawing for more than a handful of prompts.
    if not use_tqdm or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)

"""fastgen: an LLM inference engine: hand-written CPU and CUDA kernels under a small Python layer.

    from fastgen import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}])[0].text)
"""

from fastgen import envs as _envs

__version__ = "0.1.0"

# Before anything imports torch (and with it libgomp): OpenMP threads that spin for a millisecond
# after every parallel region collapse decode on a CPU shared with other programs.
_envs.bound_openmp_spinning()

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Imported lazily so `import fastgen` (e.g. for fastgen.ops in a kernel test) stays light.
    if name == "LLM":
        from fastgen.entrypoints.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from fastgen import outputs

        return getattr(outputs, name)
    if name in ("SamplingParams", "StructuredOutputs"):
        from fastgen import config

        return getattr(config, name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")

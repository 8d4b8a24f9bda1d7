"""Engine tuning that only offline batch jobs want (generation, judging, evaluation), never a
server: the settings an offline `vllm.LLM` uses, which ray.data.llm's engine does not get by itself.
"""

from __future__ import annotations

from typing import Any

from jobs.common.engine import ModelConfig, engine_kwargs


def offline_engine_kwargs(llm: ModelConfig) -> dict[str, Any]:
    """`engine_kwargs` plus the offline settings; `llm.engine_kwargs` still win."""
    kw = engine_kwargs(llm)
    # ray.data.llm builds its engine without vLLM's offline usage context, so vLLM would size its
    # batches for an interactive server (128 sequences, 2048 tokens per step); throughput mode
    # doubles those, which on CPU is exactly what an offline `vllm.LLM` uses.
    kw["performance_mode"] = "throughput"
    # and with per-step engine statistics on, which an offline `vllm.LLM` turns off: building
    # them costs the engine core and the front end CPU at every step (see `engine_metrics`)
    kw["disable_log_stats"] = not llm.engine_metrics
    kw.update(llm.engine_kwargs)
    return kw


def _final_only():
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY


class FinalOnly:
    """vLLM's `RequestOutputKind.FINAL_ONLY`, made where it is unpickled: in the engine's process,
    which has vLLM, and not in the preprocess worker, which then need not import it.

    ray.data.llm awaits only a request's final output, but leaves `output_kind` at vLLM's default
    (cumulative): the engine's front end then builds and delivers a full output of every request
    at every step. Asking for the final output only, as an offline `vllm.LLM` does, saves that."""

    def __reduce__(self):
        return _final_only, ()

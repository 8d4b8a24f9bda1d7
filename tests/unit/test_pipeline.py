"""Planning requests (resume included) and turning engine outputs into graded chain rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from jobs.formats.prompts import load_exemplars
from jobs.generate.config import GenerateConfig
from jobs.common import engine as llm_mod
from jobs.common.batch import FinishBatch, HTTPRequest, VLLMRequest, request_stage, stage_concurrency
from jobs.common.config import ConfigError, build
from jobs.common.engine import ModelConfig, cpu_binding_env, cpu_has_native_bf16, engine_kwargs
from jobs.common.offline import offline_engine_kwargs
from jobs.generate.pipeline import chain_seed, finish_rows, plan_rows
from jobs.generate.report import format_table, summarize
from jobs.common.schemas import CHAIN_SCHEMA
from jobs.tasks.sources import load_problems

CFG = build(GenerateConfig, {
    "out_dir": "runs/t", "teacher": {"model": "m"}, "paths_per_problem": 3, "seed": 11,
    "sources": [{"type": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 2}, {"name": "syllogism", "size": 1}]}],
    "prompt": {"format": "post", "few_shot": 1},
})


def planned(skip=frozenset()):
    return plan_rows(load_problems(CFG.sources), CFG, load_exemplars(), tokenizer=None, skip=skip)


def test_plan_one_row_per_problem_and_path_with_distinct_reproducible_seeds():
    rows = planned()
    assert len(rows) == 9
    assert len({(r["problem_id"], r["path_index"]) for r in rows}) == 9
    assert len({r["seed"] for r in rows}) == 9
    assert [r["seed"] for r in rows] == [r["seed"] for r in planned()]
    assert all(0 <= r["seed"] < 2**63 for r in rows)
    msgs = json.loads(rows[0]["prompt_messages"])
    assert msgs[-1]["content"] == rows[0]["question"] and rows[0]["format"] == "post"
    assert rows[0]["exemplar_ids"] and rows[0]["prompt"] is None  # no tokenizer: an HTTP teacher


def test_plan_skips_what_is_done():
    rows = planned()
    done = {(r["problem_id"], r["path_index"]) for r in rows[:4]}
    rest = planned(skip=done)
    assert {(r["problem_id"], r["path_index"]) for r in rest} == {(r["problem_id"], r["path_index"]) for r in rows[4:]}


def test_seed_depends_on_every_part():
    assert len({chain_seed(0, "p", 0), chain_seed(1, "p", 0), chain_seed(0, "q", 0), chain_seed(0, "p", 1)}) == 4


def test_requests_carry_seeds_only_when_asked():
    row = planned()[0] | {"prompt": "PROMPT"}
    assert "seed" not in VLLMRequest(CFG.sampling, seeded=False)(row)["sampling_params"]
    req = VLLMRequest(CFG.sampling, seeded=True)(row)
    assert req["prompt"] == "PROMPT" and req["sampling_params"]["seed"] == row["seed"]
    payload = HTTPRequest(CFG.sampling, "teacher-x", seeded=True)(row)["payload"]
    assert payload["model"] == "teacher-x" and payload["messages"] == json.loads(row["prompt_messages"])
    assert payload["max_tokens"] == CFG.sampling.max_tokens


def test_engine_is_asked_for_final_outputs_only():
    """The request reaches the engine's process pickled (Ray Data) and asks for the final output
    only, as an offline vllm.LLM does, instead of one output per request per step."""
    import pickle

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sent = VLLMRequest(CFG.sampling, seeded=False)(planned()[0] | {"prompt": "PROMPT"})["sampling_params"]
    params = SamplingParams(**pickle.loads(pickle.dumps(sent)))
    assert params.output_kind is RequestOutputKind.FINAL_ONLY and params.max_tokens == CFG.sampling.max_tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's offline batch sizes on a GPU depend on its model; "
                    "cotd's match them on CPU")
def test_engine_batches_as_many_sequences_as_offline_vllm(tiny_model):
    """ray.data.llm's engine gets vLLM's interactive-server batch sizes unless asked otherwise;
    cotd's engine arguments give it what an offline vllm.LLM uses on this machine."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    kw = offline_engine_kwargs(ModelConfig(model=str(tiny_model)))
    assert "performance_mode" not in engine_kwargs(ModelConfig(model=str(tiny_model)))  # a server keeps vLLM's own
    ours = EngineArgs(model=str(tiny_model), **kw).create_engine_config().scheduler_config
    plain = {k: v for k, v in kw.items() if k != "performance_mode"}
    offline = EngineArgs(model=str(tiny_model), **plain).create_engine_config(UsageContext.LLM_CLASS).scheduler_config
    served = EngineArgs(model=str(tiny_model), **plain).create_engine_config().scheduler_config
    assert ours.max_num_seqs == offline.max_num_seqs > served.max_num_seqs
    assert ours.max_num_batched_tokens == offline.max_num_batched_tokens


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma {extra}\n\n"


@pytest.mark.parametrize("extra, native", [("", False), ("avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                                           ("amx_bf16 amx_tile", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, extra, native):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    assert cpu_has_native_bf16(str(info)) is native


def test_dtype_auto_runs_float32_on_a_cpu_without_native_bf16(monkeypatch):
    """bf16 on an AVX2-only CPU made vLLM ~10x slower than float32 (the demo's engine timed out)."""
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: False)
    assert engine_kwargs(ModelConfig(model="m"))["dtype"] == "float32"
    assert engine_kwargs(ModelConfig(model="m", use_gpu=True))["dtype"] == "bfloat16"
    assert engine_kwargs(ModelConfig(model="m", dtype="bfloat16"))["dtype"] == "bfloat16"
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: True)
    assert engine_kwargs(ModelConfig(model="m"))["dtype"] == "bfloat16"


@pytest.mark.parametrize("cores, binding, env", [
    # a small machine: the engine's scheduler shares the compute threads' cores instead of keeping one
    (2, "auto", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}), (4, "auto", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    (16, "auto", {}),  # a larger one keeps vLLM's binding
    (2, "vllm", {}), (2, "0-1", {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    (2, "0-3|4-7", {"VLLM_CPU_OMP_THREADS_BIND": "0-3|4-7"}),
])
def test_cpu_binding(monkeypatch, cores, binding, env):
    monkeypatch.setattr(llm_mod, "physical_cores", lambda: cores)
    assert cpu_binding_env(ModelConfig(model="m", cpu_binding=binding)) == env
    assert cpu_binding_env(ModelConfig(model="m", cpu_binding=binding, use_gpu=True)) == {}


def test_physical_cores_counts_this_process_cores():
    import os

    assert 1 <= llm_mod.physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", ["all", "0-", "a,b", "1;2"])
def test_bad_cpu_binding_is_refused(bad):
    with pytest.raises(ConfigError, match="cpu_binding must be auto, vllm or a CPU list"):
        build(ModelConfig, {"model": "m", "cpu_binding": bad})


def engine_rows():
    rows = planned()[:5]
    gold = rows[0]["gold_answer"]
    rows[0] |= {"generated_text": f"Answer: {gold}\nReasoning:\nStep 1: add\nStep 2: done", "num_generated_tokens": 20,
                "num_input_tokens": 100, "time_taken_llm": 1.5, "__inference_error__": ""}
    rows[1] |= {"generated_text": "Answer: -99999\nReasoning:\nStep 1: guess", "num_generated_tokens": 512,
                "num_input_tokens": 100, "time_taken_llm": 1.0, "__inference_error__": ""}
    rows[2] |= {"generated_text": "I am not sure", "num_generated_tokens": 5, "num_input_tokens": 100,
                "time_taken_llm": 1.0, "__inference_error__": ""}
    rows[3] |= {"__inference_error__": "ValueError: prompt (4000 tokens) is longer than max_model_len"}
    rows[4] |= {"http_response": {"error": {"message": "context length exceeded", "code": 400}}}
    return rows


def test_finish_rows_parses_grades_and_keeps_failures():
    out = finish_rows(engine_rows(), max_tokens=512)
    assert [r["status"] for r in out] == ["ok", "ok", "unparsed", "error", "error"]
    assert [r["correct"] for r in out] == [True, False, False, None, None]
    assert out[0]["steps"] == ["add", "done"] and out[0]["num_steps"] == 2 and out[0]["output_tokens"] == 20
    assert out[1]["finish_reason"] == "length" and out[0]["finish_reason"] == "stop"
    assert "max_model_len" in out[3]["error"] and "context length" in out[4]["error"]
    table = pa.Table.from_pylist(out, schema=CHAIN_SCHEMA)  # the documented schema holds every row
    summary = summarize(table)
    assert summary["status"] == {"ok": 2, "unparsed": 1, "error": 2}
    assert summary["by_category"]["math"]["graded"] == 3 and summary["duplicates"] == 0
    assert "total" in format_table(summary)


def test_finishing_actors_warm_up_once_and_match_the_model_workers():
    """The finishing stage's actors load the verifiers when they start, not at the first result."""
    from functools import partial

    from jobs.tasks import verify

    verify._gym_scorer.cache_clear()
    finisher = FinishBatch(partial(finish_rows, max_tokens=512), CHAIN_SCHEMA,
                           warm=partial(verify.warm, ["exact", "math", "rg:chain_sum"]))
    assert verify._gym_scorer.cache_info().currsize == 1  # chain_sum's scorer is loaded
    batch = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "http_response"} for r in engine_rows()[:2]])
    out = finisher(batch)
    assert out.schema == CHAIN_SCHEMA and out.column("correct").to_pylist() == [True, False]
    assert verify._gym_scorer.cache_info().currsize == 1
    assert stage_concurrency(ModelConfig(model="m", concurrency=(2, 8))) == (2, 8)
    assert request_stage(ModelConfig(model="m", concurrency=(2, 8)))["compute"].size == 8
    assert stage_concurrency(ModelConfig(model="m", backend="openai", base_url="http://h/v1", http_concurrency=3)) == (1, 3)


def test_http_response_is_read():
    row = planned()[0] | {"http_response": {"error": None, "choices": [{"message": {"content": "Answer: 1"}, "finish_reason": "stop"}],
                                            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}}
    out = finish_rows([row], max_tokens=512)[0]
    assert (out["chain"], out["prompt_tokens"], out["output_tokens"], out["answer"]) == ("Answer: 1", 7, 3, "1")


def test_replicas_reserve_their_cpus_and_custom_resources():
    from jobs.common.batch import replica_placement

    cpu = build(ModelConfig, {"model": "m", "cpus_per_replica": 2, "replica_resources": {"teacher_node": 1}})
    assert replica_placement(cpu) == {"bundles": [{"CPU": 2, "teacher_node": 1}]}
    gpu = build(ModelConfig, {"model": "m", "use_gpu": True, "tensor_parallel_size": 2, "replica_resources": {"big": 0.5}})
    assert replica_placement(gpu) == {"bundles": [{"GPU": 1, "CPU": 1, "big": 0.5}] * 2}
    assert replica_placement(build(ModelConfig, {"model": "m", "use_gpu": True})) is None
    for bad, message in (({"CPU": 1}, "set by cpus_per_replica"), ({"slot": 0}, r"replica_resources.slot must be a number > 0")):
        with pytest.raises(ConfigError, match=message):
            build(ModelConfig, {"model": "m", "replica_resources": bad})


def test_replicas_the_queue_of_work_can_reach():
    from jobs.common.batch import reachable_replicas

    def llm(**kw):
        return build(ModelConfig, {"model": "m", "concurrency": [1, 3], **kw})

    # 96 rows in batches of 8 with 16 in flight per replica: 12 batches never fill one replica
    reach = reachable_replicas(96, llm(batch_size=8, max_concurrent_batches=16))
    assert reach.replicas == 1 and reach.batches == 12 and reach.threshold == 1.75
    # a second replica once 1.75 x 16 = 28 batches wait on the first, a third at 56 on two
    assert reachable_replicas(27 * 16, llm(batch_size=16, max_concurrent_batches=16)).replicas == 1
    assert reachable_replicas(28 * 16, llm(batch_size=16, max_concurrent_batches=16)).replicas == 2
    assert reachable_replicas(56 * 16, llm(batch_size=16, max_concurrent_batches=16)).replicas == 3
    assert reachable_replicas(10_000, llm(batch_size=2, max_concurrent_batches=1)).replicas == 3   # never past the max
    assert reachable_replicas(1, llm(concurrency=[2, 4])).replicas == 2                             # never under the min
    # a replica that may hold fewer tasks than the threshold asks for never scales up
    assert reachable_replicas(10_000, llm(batch_size=2, max_concurrent_batches=1), threshold=2.5, factor=2).replicas == 1

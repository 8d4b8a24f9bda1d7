"""Evaluate models on held-out problems: did distillation work, per reasoning category, at what
cost, and what did the student forget?

Run as:
    python -m jobs.evaluate --config configs/eval/quickstart.yaml student=runs/quickstart/student
    cotd eval --config configs/eval/quickstart.yaml student=runs/q1/student out_dir=runs/q1/eval

Resolves the models (from the student's lineage: its base model, the teacher that wrote its
chains, each prompted as in training or generation), loads the suites and checks that none of
their questions is in the training data, then runs every model through ray.data.llm (a base model
and its LoRA student on one engine), greedy and k sampled answers, each graded by the problem's own
verifier. Writes <out_dir>/predictions/ (every answer, kept across runs: a model evaluated before
under the same setup is not evaluated again), items/ (per model and problem), report.json,
report.md, report.html and manifest.json.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs.common.config import ConfigError, to_dict
from jobs.common.errors import DataError
from jobs.common.progress import emit
from jobs.common.runs import (PartWriter, clean_partial, drop_rows, existing_keys, publish, read_dataset, read_json,
                              write_json, write_manifest, write_text)
from jobs.common.schemas import ERROR, ITEM_SCHEMA, PREDICTION_KEY, PREDICTION_SCHEMA, UNPARSED
from jobs.evaluate.config import EvalConfig

STAGE = "evaluate"


def main(cfg: EvalConfig, log=emit) -> dict[str, Any]:
    started = time.time()
    out = Path(cfg.out_dir)
    cache = Path(cfg.cache) if cfg.cache else out / "predictions"

    # validate: the models (and their lineage), the suites, their disjointness from the training
    # data, before Ray or an engine starts
    from jobs.common.models import resolve
    from jobs.evaluate.targets import check_disjoint, entry_targets, lineage, student_targets
    from jobs.tasks.sources import load_problems

    resolve_quiet = partial(resolve, log=log)
    targets, training = [], [Path(p) for p in cfg.exclude]
    if cfg.student:
        lin = lineage(cfg.student)
        targets += student_targets(cfg, lin, resolve_quiet)
        training += [p for p in (lin.curated, lin.chains) if p is not None]
    targets += entry_targets(cfg, cfg.models, resolve_quiet)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"models: two models share a name ({names}); the student's lineage adds teacher, base and student")
    unknown = sorted(set(cfg.sampled or []) - set(names))
    if unknown:
        raise ConfigError(f"sampled: no model named {', '.join(unknown)}; the models are {', '.join(names)}")
    for t in targets:
        if t.adapter and not Path(t.adapter).is_dir():
            raise DataError(f"model {t.name!r}: adapter folder {t.adapter} does not exist")
    suites = {s.name: load_problems(s.sources) for s in cfg.suites}
    suites, compared = check_disjoint(suites, training, cfg.overlap, log=log)
    log(f"evaluating {', '.join(t.name for t in targets)} on {sum(map(len, suites.values()))} problems in "
        f"{len(suites)} suite(s); held out from {compared} training questions")

    # plan: every (model, problem, sample) not in the predictions cache; two models with one cache
    # key (the same weights, prompt and sampling) share their answers
    removed = clean_partial(cache)
    retried = drop_rows(cache, "status", ERROR)
    done = existing_keys(cache, PREDICTION_KEY)
    kinds = {s.name: s.kind for s in cfg.suites}
    keys = {t.name: t.key(cfg) for t in targets}  # each once (a key digests the adapter's files); names are unique
    unique = list({keys[t.name]: t for t in reversed(targets)}.values())[::-1]  # the first target of each key
    samples: dict[str, int] = {}  # by key: the most any model of that key asks
    for t in targets:
        samples[keys[t.name]] = max(samples.get(keys[t.name], 0), cfg.samples_for(t.name))
    groups: dict[str, list] = {}
    for t in unique:
        groups.setdefault(_engine_key(t), []).append(t)
    asks = {t.name: (keys[t.name], samples[keys[t.name]]) for t in unique}
    work = [(group, _plan(cfg, group, asks, suites, kinds, done)) for group in groups.values()]
    todo = sum(len(r) for _, r in work)
    total = sum(map(len, suites.values())) * sum(n + 1 for _, n in asks.values())
    log(f"{total} answers; {total - todo} already in {cache}"
        + (f" ({removed} partial files removed, {retried} failed answers asked again)" if removed or retried else "")
        + f"; {todo} to generate")

    # run: one engine per group of models that share one, in turn
    timing_file = cache / "timing.json"
    timing = read_json(timing_file) if timing_file.is_file() else {}
    for group, rows in work:
        if not rows:
            continue
        attempt = _run(cfg, group[0], rows, cache, log, label=f"eval {'+'.join(t.name for t in group)}")
        # the engine's time, shared among the models on it by their output tokens
        tokens = {keys[t.name]: attempt["tokens_by_key"].get(keys[t.name], 0) for t in group}
        all_tokens = max(1, sum(tokens.values()))
        for t in group:
            k = keys[t.name]
            prev = timing.get(k, {"requests": 0, "engine_seconds": 0.0})
            share = tokens[k] / all_tokens
            timing[k] = {"requests": prev["requests"] + attempt["requests_by_key"].get(k, 0),
                         "engine_seconds": prev["engine_seconds"] + attempt["seconds"] * share}
        write_json(timing_file, timing)

    # report: items, numbers, files
    from jobs.evaluate import report as R

    table = read_dataset(cache)
    by_key: dict[str, list[dict]] = {}
    wanted = {(s, p.id) for s, ps in suites.items() for p in ps}
    for r in table.to_pylist() if table is not None else []:
        if (r["suite"], r["problem_id"]) in wanted:
            by_key.setdefault(r["target_key"], []).append(r)
    # cached rows carry the label they were made under; the report uses this run's labels
    preds = [{**r, "target": t.name, "role": t.role} for t in targets for r in by_key.get(keys[t.name], [])]
    items = R.items(preds)
    costs = {t.name: _cost(t, [p for p in preds if p["target_key"] == keys[t.name]], timing.get(keys[t.name])) for t in targets}
    outputs = {(p["target"], p["suite"], p["problem_id"]): p["output"] for p in preds if p["sample_index"] == 0}
    described = [{"name": t.name, "role": t.role, "identity": t.identity, "prompt": to_dict(t.prompt),
                  "adapter": t.adapter} for t in targets]
    report = R.build_report(items, described, to_dict(cfg.bootstrap), costs, cfg.examples, outputs,
                            suite_order=[s.name for s in cfg.suites])
    images = R.plots(report)
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        PartWriter(staging / "items", ITEM_SCHEMA).write(pa.Table.from_pylist(items, schema=ITEM_SCHEMA))
        for name, data in images.items():
            (staging / f"{name}.png").write_bytes(data)
        publish(staging, out, ["items", *(f"{name}.png" for name in images)])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    md = R.markdown(report, {name: f"{name}.png" for name in images})
    write_json(out / "report.json", report)
    write_text(out / "report.md", md)
    write_text(out / "report.html", R.to_html(md, images))
    manifest = write_manifest(out, STAGE, cfg, cfg.fingerprint(), started,
                              models=described, suites={s: len(ps) for s, ps in suites.items()},
                              predictions=str(cache), summary=_headline(report),
                              outputs={n: str(out / n) for n in ("items", "report.json", "report.md", "report.html")})
    log("\n" + summary_table(report))
    log(f"report: {out / 'report.html'} (and report.md, report.json)")
    return manifest


def _plan(cfg: EvalConfig, group: list, asks: dict[str, tuple[str, int]], suites: dict, kinds: dict,
          done: set) -> list[dict[str, Any]]:
    """Request rows of the models that share one engine; the engine's tokenizer templates them.
    `asks`: by model name, its cache key and the sampled answers it gets besides the greedy one."""
    from jobs.common.engine import load_tokenizer
    from jobs.evaluate.pipeline import plan_rows
    from jobs.formats.prompts import load_exemplars

    missing = any(_missing(done, key, ps, n) for key, n in (asks[t.name] for t in group) for ps in suites.values())
    engine = group[0].engine
    tokenizer = load_tokenizer(engine.model) if missing and engine.backend == "vllm" else None
    per_model = []
    for t in group:
        pool = load_exemplars(t.prompt.exemplars)
        key, samples = asks[t.name]
        per_model.append([r for suite, problems in suites.items()
                          for r in plan_rows(t, key, suite, kinds[suite], problems, samples,
                                             cfg.sampling.temperature, cfg.seed, pool, tokenizer, skip=done)])
    # the models' rows taken in turn: every model advances together, and a stopped run holds
    # answers of each
    return [r for turn in zip_longest(*per_model) for r in turn if r is not None]


def _engine_key(t) -> str:
    """Models on the same engine: the same model folder and engine settings (a LoRA student rides
    on its base's engine)."""
    return json.dumps(to_dict(t.engine), sort_keys=True, default=str)


def _missing(done: set, key: str, problems, samples: int) -> bool:
    return any((key, p.id, i) not in done for p in problems for i in range(samples + 1))


def _run(cfg: EvalConfig, target, rows: list[dict], folder: Path, log, label: str) -> dict[str, Any]:
    from dataclasses import replace

    from jobs.common.batch import run_llm
    from jobs.evaluate.pipeline import finish_predictions
    from jobs.tasks.verify import warm

    engine = target.engine
    adapters = sorted({r["model"] for r in rows if r.get("model") and r["model"] != engine.model})
    if adapters and engine.backend == "vllm" and any(r.get("model") == engine.model for r in rows):
        # vLLM (seen on its CPU build) applies a batch's LoRA weights to the base model's requests
        # in that batch; the base model is asked through an adapter that adds nothing instead
        from jobs.evaluate.pipeline import route_base_rows
        identity = identity_adapter(adapters[0], folder.parent / "identity-adapters")
        rows = route_base_rows(rows, engine.model, str(identity))
        adapters.append(str(identity))
    if adapters:
        engine = replace(engine, engine_kwargs={**lora_engine_kwargs(adapters), **engine.engine_kwargs})
    extra = dict(cfg.sampling.extra)
    if cfg.logprobs:
        extra.update({"logprobs": 0} if engine.backend == "vllm" else {"logprobs": True})
    sampling = replace(cfg.sampling, extra=extra)
    tokens_by_key: dict[str, int] = {}
    requests_by_key: dict[str, int] = {}

    def counts(batch) -> dict[str, int]:
        for k, tok in zip(batch.column("target_key").to_pylist(), batch.column("output_tokens").to_pylist()):
            tokens_by_key[k] = tokens_by_key.get(k, 0) + (tok or 0)
            requests_by_key[k] = requests_by_key.get(k, 0) + 1
        status = batch.column("status").to_pylist()
        return {"tokens": sum(t or 0 for t in batch.column("output_tokens").to_pylist()),
                "correct": sum(1 for c in batch.column("correct").to_pylist() if c),
                "unparsed": status.count(UNPARSED), "errors": status.count(ERROR)}

    attempt = run_llm(rows, llm=engine, sampling=sampling, model_path=engine.model if engine.backend == "vllm" else None,
                      finish=partial(finish_predictions, max_tokens=cfg.sampling.max_tokens), schema=PREDICTION_SCHEMA,
                      folder=folder, ray_cfg=cfg.ray, label=label, write_rows=64, counts=counts, log=log,
                      warm=partial(warm, sorted({r["verifier"] for r in rows})),
                      memory_key="engine.gpu_memory_utilization")
    return {**attempt, "tokens_by_key": tokens_by_key, "requests_by_key": requests_by_key}


def identity_adapter(adapter: str | Path, into: Path) -> Path:
    """A LoRA adapter that leaves the base model as it is: `adapter`'s configuration and shapes with
    every lora_B weight zero (PEFT's own initialisation), written once per adapter under `into`."""
    from safetensors.torch import load_file, save_file

    from jobs.evaluate.targets import folder_digest

    src = Path(adapter)
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise DataError(f"adapter {src}: no adapter_model.safetensors (save the adapter with PEFT's save_pretrained)")
    tensors = load_file(str(weights))
    other = sorted(k for k in tensors if "lora_" not in k)
    if other:
        raise DataError(f"adapter {src}: holds weights other than LoRA's ({other[0]}, ...); its base model "
                        "cannot share an engine with it: evaluate the base model under another engine setting")
    out = into / folder_digest(src)
    if (out / "adapter_model.safetensors").is_file():
        return out
    tmp = into / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shutil.copy(src / "adapter_config.json", tmp / "adapter_config.json")
        save_file({k: (v.zero_() if "lora_B" in k else v) for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))
        shutil.rmtree(out, ignore_errors=True)  # an earlier, incomplete one
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def lora_engine_kwargs(adapters: list[str]) -> dict[str, Any]:
    """vLLM settings that serve these PEFT adapters beside the base model: LoRA on, a rank bound
    that holds the largest adapter's."""
    ranks = []
    for a in adapters:
        conf = json.loads((Path(a) / "adapter_config.json").read_text())
        ranks.append(int(conf.get("r", 8)))
    # vLLM accepts these rank bounds
    bound = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))
    return {"enable_lora": True, "max_lora_rank": bound, "max_loras": len(adapters)}


def _cost(target, preds: list[dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, Any] | None:
    """What one query costs the model: tokens per answer, engine-seconds per query (measured: the
    engine's wall time over the requests it served), and the price of that."""
    greedy = [p for p in preds if p["sample_index"] == 0 and p["status"] != ERROR]
    if not greedy:
        return None
    out_tok = sum(p["output_tokens"] or 0 for p in greedy) / len(greedy)
    in_tok = sum(p["prompt_tokens"] or 0 for p in greedy) / len(greedy)
    per_req = timing["engine_seconds"] / timing["requests"] if timing and timing.get("requests") else None
    price, per_query = target.price, None
    if price.per_hour is not None and per_req is not None:
        per_query = per_req * price.devices * price.per_hour / 3600
    elif price.input_per_million is not None or price.output_per_million is not None:
        per_query = (in_tok * (price.input_per_million or 0) + out_tok * (price.output_per_million or 0)) / 1e6
    return {"output_tokens": out_tok, "prompt_tokens": in_tok, "engine_seconds_per_query": per_req,
            "per_query": per_query, "price": to_dict(price)}


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's summary: overall accuracy of each model per suite, recovery and gain."""
    out = {"accuracy": {name: {s: r["overall"]["accuracy"] for s, r in m["suites"].items()}
                        for name, m in report["models"].items()}}
    out["recovery"] = {s: c["recovery"]["overall"]["value"] for s, c in report["comparisons"].items() if "recovery" in c}
    out["gain_over_base"] = {s: c["gain_over_base"]["overall"]["value"] for s, c in report["comparisons"].items()
                             if "gain_over_base" in c}
    out["cost_per_1k"] = {k: v["per_1k_queries"] for k, v in report["cost"].items() if isinstance(v, dict)}
    return out


def summary_table(report: dict[str, Any]) -> str:
    """The end-of-run table: accuracy of each model per suite and category, recovery and gain."""
    from jobs.evaluate.report import fmt_diff, fmt_ratio

    lines = []
    for s in report["suites"]:
        suite = s["name"]
        cats = sorted({c for m in report["models"].values() for c in m["suites"].get(suite, {}).get("by_category", {})})
        widths = [max(12, len(c) + 2) for c in cats]  # a long category name keeps a space before it
        head = f"{'suite ' + suite:<24}" + "".join(f"{c:>{w}}" for c, w in zip(cats, widths)) + f"{'overall':>12}"
        lines += [head, "-" * len(head)]
        for name, m in report["models"].items():
            res = m["suites"].get(suite)
            if not res:
                continue
            cells = "".join(f"{_fmt(res['by_category'].get(c, {}).get('accuracy')):>{w}}" for c, w in zip(cats, widths))
            lines.append(f"{name:<24}{cells}{_fmt(res['overall']['accuracy']):>12}")
        comp = report["comparisons"].get(suite, {})
        if "recovery" in comp:
            lines.append(f"  recovery (student/teacher): {fmt_ratio(comp['recovery']['overall'])}")
        if "gain_over_base" in comp:
            lines.append(f"  gain over base: {fmt_diff(comp['gain_over_base']['overall'])}")
    for name, c in report["cost"].items():
        if isinstance(c, dict):
            lines.append(f"cost per 1,000 queries, {name}: ${c['per_1k_queries']:.4f}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"

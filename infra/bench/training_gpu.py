"""Student training on one GPU: real tokens/s, MFU and peak memory of cotd's training step for
LoRA and full fine-tuning, with the GPU's measured bf16 matrix-product rate as the baseline.

What runs is a Ray Train worker's step (jobs/train/loop.py): the student built by `build_model`
(packed micro-batches through cotd's varlen attention), the DeepSpeed engine on the config
`deepspeed_config` derives, and `optimizer_step`. Ray is left out: the step is the same code,
and what Ray adds around it is measured on CPU by infra/bench/training.py (b). The model is
given by its Hugging Face folder; a folder without weights (only config.json) gets random ones,
which train exactly as fast. The data is the real CoT length distribution of a generate run
(prompt and answer lengths; token ids are drawn at random).

Two steps, because the GPU machine need not have what reading a generate run takes:
    .venv/bin/python infra/bench/training_gpu.py lengths --chains runs/q1/chains --model qwen2.5-coder-0.5b-instruct --out lengths.json
    python infra/bench/training_gpu.py run --lengths lengths.json --model path/to/qwen2.5-coder-1.5b-instruct
infra/bench/gpu_kit.sh does the first and gathers the wheels a machine without DeepSpeed needs.
`--micro-batch` and `--loss-chunk` take comma lists: every combination runs in one process.
`--cpu` runs the steps on a CPU where there is no GPU (it checks the script; no MFU).

MFU is model FLOPs (jobs/train/flops.py) over the step's time and the GPU's data-sheet dense
bf16 peak; `of matmul` puts the same FLOPs against the matrix-product rate measured in this run.
Target: MFU >= 0.40 for full fine-tuning on an H100.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def write_lengths(args) -> None:
    from transformers import AutoTokenizer

    from infra.bench.training import chain_examples
    from jobs.common.models import resolve
    from jobs.train.data import IGNORE, tokenize_example

    tok = AutoTokenizer.from_pretrained(resolve(args.model))
    pairs = []
    for _, messages in chain_examples(Path(args.chains)):
        ids, labels, _ = tokenize_example(messages, tok, 10**9)
        prompt = sum(1 for x in labels if x == IGNORE)
        pairs.append([prompt, len(ids) - prompt])
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"chains": str(args.chains), "tokenizer": args.model, "prompt_answer": pairs}))
    tmp.replace(out)
    print(f"{len(pairs)} examples from {args.chains} -> {out}")


def matmul_rate(device, size: int = 8192, repeats: int = 20) -> float:
    """bf16 FLOP/s of one large matrix product on random data (median of `repeats`)."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_rank(cuda: bool, port: str) -> None:
    """The process group of one rank that DeepSpeed needs, without Ray Train (NCCL or gloo)."""
    import deepspeed

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", port)})
    if not cuda:
        from jobs.train.loop import skip_unused_cpu_ops

        skip_unused_cpu_ops()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def model_folder(model: str, tmp: Path) -> str:
    """The model's folder; one with only a config gets random weights (saved once under `tmp`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.common.models import resolve

    path = Path(resolve(model))
    if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return str(path)
    out = tmp / "random-init"
    if not out.is_dir():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16).save_pretrained(out)
    return str(out)


def sequences(pairs: list[list[int]], vocab: int, cfg, count: int, seed: int = 0) -> list[dict[str, list]]:
    """`count` training sequences with the given prompt/answer lengths, cut to max_seq_len and,
    when packing, packed 512 examples at a time, as the training job cuts and packs them."""
    from jobs.train.data import IGNORE, example_sequence, pack

    rng = random.Random(seed)
    seqs: list[dict[str, list]] = []
    while len(seqs) < count:
        chunk = []
        for prompt, answer in rng.sample(pairs, len(pairs)) * (512 // len(pairs) + 1):
            ids = [rng.randrange(vocab) for _ in range(prompt + answer)][:cfg.max_seq_len]
            labels = ([IGNORE] * prompt + ids[prompt:])[:cfg.max_seq_len]
            chunk.append(example_sequence(ids, labels, 1.0))
        chunk = chunk[:512] if cfg.packing else chunk
        seqs += pack(chunk, cfg.max_seq_len) if cfg.packing else chunk
    return seqs[:count]


def bench(args, device, method: str, micro_batch: int, loss_chunk: int, folder: str, pairs, vocab: int,
          peak: float | None, matmul: float) -> dict:
    import torch

    from jobs.common.config import build
    from jobs.train.config import TrainConfig, deepspeed_config
    from jobs.train.data import IGNORE, collate, collate_packed
    from jobs.train.flops import StepFlops, example_lengths
    from jobs.train.loop import build_engine, optimizer_step

    cfg = build(TrainConfig, {
        "data": "-", "out_dir": "-", "model": folder, "method": method, "precision": "bf16",
        "zero": {"stage": args.zero}, "packing": not args.padded, "max_seq_len": args.max_seq_len,
        "micro_batch_size": micro_batch, "grad_accum": args.grad_accum, "lr": 1e-5 if method == "full" else 2e-4,
        "warmup_steps": 0, "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile, "loss_chunk_tokens": loss_chunk,
        "scaling": {"num_workers": 1, "use_gpu": device.type == "cuda"}})
    total = args.warmup + args.steps
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, engine, _ = build_engine(cfg, folder, deepspeed_config(cfg, total, bf16=True))
    engine.train()
    step_flops = StepFlops(model)
    collate_fn = collate_packed if cfg.packing else (lambda s: collate(s, pad_id=0))
    per_step = cfg.micro_batch_size * cfg.grad_accum
    seqs = sequences(pairs, vocab, cfg, total * per_step)

    times, tokens, flops, losses = [], [], [], []
    for step in range(total):
        window = [seqs[(step * cfg.grad_accum + m) * cfg.micro_batch_size:][:cfg.micro_batch_size]
                  for m in range(cfg.grad_accum)]
        sync(device)
        t0 = time.perf_counter()
        cpu = [collate_fn(mb) for mb in window]
        weight = sum(float(b["weights"][:, 1:].sum()) for b in cpu)
        batches = [{k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in b.items()} for b in cpu]
        loss_sum, total_weight = optimizer_step(engine, batches, weight, 1, cfg.grad_accum, device,
                                                cfg.loss_chunk_tokens)
        losses.append(float(loss_sum) / total_weight)  # waits for the step, as the training loop's report does
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(s["input_ids"]) for mb in window for s in mb))
            labels = sum(int((b["labels"] != IGNORE).sum()) for b in cpu)
            flops.append(step_flops((n for mb in window for s in mb for n in example_lengths(s["position_ids"])), labels))
    if args.profile:
        profile_step(lambda: optimizer_step(engine, batches, weight, 1, cfg.grad_accum, device, cfg.loss_chunk_tokens))
    seconds = sum(times)
    row = {"method": method, "zero": cfg.zero.stage, "compile": cfg.compile, "loss_chunk": cfg.loss_chunk_tokens,
           "micro_batch": cfg.micro_batch_size, "packing": cfg.packing, "tokens_per_step": tokens[0],
           "tok_s": sum(tokens) / seconds, "tflops": sum(flops) / seconds / 1e12,
           "mfu": sum(flops) / seconds / peak if peak else None, "of_matmul": sum(flops) / seconds / matmul,
           "step_s_median": statistics.median(times),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}
    return row


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def profile_step(step) -> None:
    """One more optimizer step under the PyTorch profiler: the kernels that took the GPU's time,
    and how busy the GPU was over the step's wall time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    # kernels alone (the ops that launched them carry the same time again)
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    print(events.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(f"profiled step: wall {wall:.3f} s, kernels {busy:.3f} s (GPU busy {busy / wall:.0%})", flush=True)


def run(args) -> None:
    import deepspeed
    import torch
    from transformers import AutoConfig

    from jobs.train.flops import peak_flops

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        sys.exit("training_gpu.py run: no CUDA GPU here (--cpu runs the same steps on the CPU, to check the script)")
    if args.profile and not cuda:
        sys.exit("training_gpu.py run: --profile needs a CUDA GPU")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    one_rank(cuda, "29533")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = peak_flops(name) if cuda else None
    matmul = matmul_rate(device) if cuda else matmul_rate(device, size=1024, repeats=3)
    lengths = json.loads(Path(args.lengths).read_text())
    pairs = lengths["prompt_answer"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            folder = model_folder(model, Path(tmp) / Path(model).name)
            vocab = AutoConfig.from_pretrained(folder).vocab_size
            for method, micro_batch, loss_chunk in itertools.product(
                    args.methods.split(","), ints(args.micro_batch), ints(args.loss_chunk)):
                try:
                    row = bench(args, device, method, micro_batch, loss_chunk, folder, pairs, vocab, peak, matmul)
                except torch.OutOfMemoryError as e:
                    row = {"method": method, "micro_batch": micro_batch, "loss_chunk": loss_chunk,
                           "error": f"out of GPU memory: {str(e).splitlines()[0][:80]}"}
                gc.collect()  # the engine and its optimizer state go before the next one
                if cuda:
                    torch.cuda.empty_cache()
                row["model"] = Path(model).name
                results.append(row)
                print(json.dumps(row), flush=True)
    mean_len = statistics.mean(p + a for p, a in pairs)
    print(json.dumps({"device": name, "peak_bf16_tflops": peak / 1e12 if peak else None,
                      "matmul_tflops": matmul / 1e12, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "examples": len(pairs), "mean_example_tokens": round(mean_len, 1),
                      "max_seq_len": args.max_seq_len, "grad_accum": args.grad_accum, "compile": args.compile}))
    print(f"\n{'model':<30} {'method':<6} {'mb':>3} {'chunk':>6} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'of matmul':>9} {'mem GiB':>8}")
    for r in results:
        head = f"{r['model']:<30} {r['method']:<6} {r['micro_batch']:>3} {r['loss_chunk']:>6}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{head} {r['tok_s']:>9.0f} {r['tflops']:>8.1f} {mfu:>6} {r['of_matmul']:>9.3f} {r['peak_mem_gib']:>8.1f}")
    print(f"matmul baseline {matmul / 1e12:.0f} TFLOP/s measured; data-sheet peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s ({name}); target MFU >= 0.40 for full fine-tuning")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("lengths", help="prompt/answer token lengths of a generate run's answered chains")
    lp.add_argument("--chains", required=True, help="a generate run's chains folder")
    lp.add_argument("--model", required=True, help="the student (its tokenizer counts the tokens)")
    lp.add_argument("--out", required=True)
    rp = sub.add_parser("run", help="time cotd's training step on this GPU")
    rp.add_argument("--lengths", required=True, help="a file written by `lengths`")
    rp.add_argument("--model", required=True, action="append", help="model folder (repeat for several)")
    rp.add_argument("--methods", default="full,lora")
    rp.add_argument("--zero", type=int, default=2)
    rp.add_argument("--max-seq-len", type=int, default=4096)
    rp.add_argument("--micro-batch", default="2", help="rows per micro-batch; a comma list runs each")
    rp.add_argument("--grad-accum", type=int, default=4)
    rp.add_argument("--padded", action="store_true", help="padded batches instead of packed")
    rp.add_argument("--gradient-checkpointing", action="store_true")
    rp.add_argument("--compile", action="store_true", help="train with compile: true (torch.compile per layer)")
    rp.add_argument("--loss-chunk", default="0",
                    help="train with loss_chunk_tokens (0: loss from the logits); a comma list runs each")
    rp.add_argument("--warmup", type=int, default=3)
    rp.add_argument("--steps", type=int, default=10)
    rp.add_argument("--profile", action="store_true", help="print a profile of one more step")
    rp.add_argument("--cpu", action="store_true",
                    help="where there is no GPU: the same steps on the CPU (checks the script; MFU is not computed)")
    args = p.parse_args()
    write_lengths(args) if args.cmd == "lengths" else run(args)


if __name__ == "__main__":
    main()

"""Where a demo training step's time goes: the data loader against the model (issue 5).

``python bench/bench_demo_training.py`` on the machine that will run ``python -m train.demo``
(a GPU when there is one). It generates a small synthetic training set as the recipe does,
then prints, in one process:

  * loader: conversations/s that ``--workers`` DataLoader processes deliver (decode the PNG,
    image processor, tokenizer, padding), the model left out;
  * model: conversations/s of forward + backward of the dense demo model and of its
    upcycled MoE on batches already on the device (bf16 autocast on CUDA), the loader left out;
  * the top operators of a profiled model step (``torch.profiler``), self time;
  * the cost of the box-attention loss (``train.box_attention``, an option of the demo recipe's
    dense and MoE stages, off in its configs): dense model conversations/s with it, as the recipe computes it (the model's own
    attention kernel, the supervised head's rows recomputed) and with the whole model on eager
    attention (the plain way to get attention weights), each as a ratio to the step without it.

The slower of the first two bounds a training step; their ratio says which to work on.

``--precision`` instead times forward + backward of the dense and the MoE model in fp32 and in
bf16 autocast on the same batches, interleaved (fp32, bf16, fp32), and prints the ratio: whether
the loop's bf16 (``train.loop.has_bf16``: CUDA, or a CPU with AVX512-BF16 or AMX) pays here.

Usage: python bench/bench_demo_training.py [--scenes 300] [--workers 14] [--micro-batch 16] [--steps 10]
       python bench/bench_demo_training.py --precision --scenes 40 --micro-batch 4 --steps 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import skymoe  # noqa: E402
from train.box_attention import BoxAttentionLoss, BoxAttentionSettings, plus_box_attention, supervising  # noqa: E402
from train.dataset import InstructionDataset, PaddingCollator, read_instruction_jsonl  # noqa: E402
from train.demo import DemoData, DemoModel, _conversation_texts, build_demo_model, build_training_data  # noqa: E402
from train.loop import bf16_autocast, has_bf16  # noqa: E402


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(dataset, collator, micro_batch: int, workers: int, batches: int) -> float:
    """Conversations/s the DataLoader delivers after its first batch (worker start left out)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, shuffle=True, collate_fn=collator,
                                         num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * micro_batch / (time.perf_counter() - start)


def model_rate(model, batches: list[dict], device: torch.device, steps: int,
               box_attention: BoxAttentionLoss | None = None, bf16: bool = True) -> float:
    """Conversations/s of forward + backward on batches already on ``device`` (after two warm-up steps),
    with the box-attention loss added when given, in bf16 autocast where the loop would use it and ``bf16``."""
    model.train()

    def step(batch):
        with bf16_autocast(device, bf16):
            loss, _ = plus_box_attention(model(**batch).loss, batch, box_attention)
        loss.backward()
        model.zero_grad(set_to_none=True)

    with supervising(box_attention):
        for batch in batches[:2]:
            step(batch)
        _synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        _synchronize(device)
    return steps * batches[0]["input_ids"].shape[0] / (time.perf_counter() - start)


def top_operators(model, batch: dict, device: torch.device, rows: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with bf16_autocast(device):
            loss = model(**batch).loss
        loss.backward()
        _synchronize(device)
    model.zero_grad(set_to_none=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def precision_ratios(model, batches: list[dict], device: torch.device, steps: int) -> int:
    """Print conversations/s of the dense and the upcycled MoE model in fp32 and bf16 autocast;
    fp32 is timed before and after bf16 and the faster of the two kept, so drift on a shared
    machine does not favour bf16."""
    print(f"device: {_device_name(device)}; bf16 autocast used by the training loop here: {has_bf16(device)}")
    if not has_bf16(device):
        print("no native bf16 on this device: the loop trains in fp32, nothing to compare")
        return 0
    moe_model = skymoe.upcycle(model, DemoModel().num_experts, None, num_experts_per_tok=DemoModel().top_k)
    for label, m in (("dense", model), (f"MoE (E={DemoModel().num_experts})", moe_model)):
        fp32_before = model_rate(m, batches, device, steps, bf16=False)
        bf16 = model_rate(m, batches, device, steps, bf16=True)
        fp32 = max(fp32_before, model_rate(m, batches, device, steps, bf16=False))
        print(f"model, {label}: fp32 {fp32:6.2f}, bf16 autocast {bf16:6.2f} conversations/s "
              f"(bf16 / fp32 = {bf16 / fp32:.2f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--workers", type=int, default=14, help="DataLoader worker processes")
    parser.add_argument("--micro-batch", type=int, default=16, help="conversations per forward")
    parser.add_argument("--steps", type=int, default=10, help="timed model steps (loader: 4x as many batches)")
    parser.add_argument("--max-length", type=int, default=800)
    parser.add_argument("--precision", action="store_true", help="only compare fp32 with bf16 autocast")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        _, moe_jsonl, _ = build_training_data(work, DemoData(scenes=args.scenes, workers=max(1, args.workers)), seed=0)
        print(f"data: {args.scenes} scenes in {time.perf_counter() - start:.1f} s")
        tokenizer = skymoe.build_tokenizer(_conversation_texts(moe_jsonl), vocab_size=DemoModel().bpe_vocab)
        model, processor = build_demo_model(DemoModel(), tokenizer, seed=0)
        model.to(device)
        records, _ = read_instruction_jsonl(moe_jsonl)
        dataset = InstructionDataset(records, processor, args.max_length)
        collator = PaddingCollator(processor.tokenizer.pad_token_id)
        batches = [{k: v.to(device) for k, v in collator([dataset[(b * args.micro_batch + i) % len(dataset)]
                                                          for i in range(args.micro_batch)]).items()}
                   for b in range(4)]
        if args.precision:
            return precision_ratios(model, batches, device, args.steps)
        loader = loader_rate(dataset, collator, args.micro_batch, args.workers, 4 * args.steps)
        dense = model_rate(model, batches, device, args.steps)
        dense_ops = top_operators(model, batches[0], device, 15)
        box_loss = BoxAttentionLoss(model, tokenizer, BoxAttentionSettings(coef=1.0))
        box_recomputed = model_rate(model, batches, device, args.steps, box_loss)
        attention_kernel = model.config._attn_implementation
        model.set_attn_implementation("eager")
        box_eager = model_rate(model, batches, device, args.steps, box_loss)
        model.set_attn_implementation(attention_kernel)
        moe_model = skymoe.upcycle(model, DemoModel().num_experts, None, num_experts_per_tok=DemoModel().top_k)
        moe = model_rate(moe_model, batches, device, args.steps)
        moe_ops = top_operators(moe_model, batches[0], device, 15)
    print("\ndense model step, top operators:\n" + dense_ops)
    print("MoE model step, top operators:\n" + moe_ops)
    print(f"device: {_device_name(device)}; micro-batch {args.micro_batch}, max_length {args.max_length}")
    print(f"loader, {args.workers} workers: {loader:8.1f} conversations/s")
    print(f"model, dense:        {dense:8.1f} conversations/s  (loader / model = {loader / dense:.2f})")
    print(f"model, MoE (E=4):    {moe:8.1f} conversations/s  (loader / model = {loader / moe:.2f})")
    print(f"dense + box-attention loss, {attention_kernel} + recomputed head: {box_recomputed:8.1f} conversations/s "
          f"({box_recomputed / dense:.2f} of the step without it)")
    print(f"dense + box-attention loss, eager attention:        {box_eager:8.1f} conversations/s "
          f"({box_eager / dense:.2f} of the step without it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

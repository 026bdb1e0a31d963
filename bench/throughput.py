"""Benchmark: training and inference throughput of a model on random data of MOSI's shapes.

A training step is the full step the pipeline runs: forward, every loss term, backward, Adam. The model
is built from `params.yaml` (what the pipeline trains), width 50 and 10 heads as DMD's MOSI setting
unless overridden with -S. Step times are medians (CPU step times can be bimodal from page faults).
Prints {"train_samples_per_s", "infer_samples_per_s", "peak_rss_mb", "params", ...} with --json; with
`--model all`, a list of them, one per model of the registry, in one process (peak RSS is then the
process's so far, and only the first model's figure is its own).

    python bench/throughput.py --model mdkat --batch 64 --threads 2 --steps 30 --warmup 5 --json
    python bench/throughput.py --model mdkat -S model.mdkat.use_cff=false --json
    python bench/throughput.py --model all --json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from mdkat.checks import load_checked
from mdkat.data import Batch
from mdkat.models import REGISTRY, build

DIMS = {"text": 768, "audio": 5, "vision": 20}  # MOSI: BERT, 5 COVAREP, 20 FACET columns


def random_batch(n: int, steps: dict[str, int], generator: torch.Generator, device: torch.device) -> Batch:
    """Random features and labels of MOSI's dims, lengths uniform in [T/5, T] (aligned: one length)."""
    t_text = steps["text"]
    text_len = torch.randint(max(1, t_text // 5), t_text + 1, (n,), generator=generator)
    lengths = {m: (text_len * steps[m] // t_text).clamp(1, steps[m]) for m in DIMS}
    features = {m: torch.randn(n, steps[m], d, generator=generator) for m, d in DIMS.items()}
    label = (torch.rand(n, generator=generator) * 6 - 3).round(decimals=1)
    batch = Batch(
        **features, **{f"{m}_len": lengths[m] for m in DIMS}, label=label, id=[str(i) for i in range(n)]
    )
    return batch.to(device)


def _median_seconds(fn, steps: int, warmup: int, device: torch.device) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, args: argparse.Namespace) -> dict:
    """Median train-step and inference throughput of model `name` under `args`."""
    torch.manual_seed(0)
    overrides = [o for o in args.overrides if not o.startswith("model.") or o.startswith(f"model.{name}.")]
    params = load_checked(args.params, [f"model.name={name}", *overrides], data=False)
    device = torch.device(args.device)
    steps = (
        {"text": 50, "audio": 375, "vision": 500}
        if args.unaligned
        else {"text": 50, "audio": 50, "vision": 50}
    )
    generator = torch.Generator().manual_seed(0)
    train_batch = random_batch(args.batch, steps, generator, device)
    infer_batch = random_batch(args.infer_batch, steps, generator, device)

    # sizes: models with per-sample state (Self-MM) index it by the batch's positions 0..B-1
    sizes = {"train": args.batch, "valid": args.infer_batch}
    model = build(params, DIMS, aligned=not args.unaligned, sizes=sizes).to(device)
    weights = params.weights()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step() -> None:
        model.train()
        total, _ = model.loss(model(train_batch), train_batch, weights)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        model.eval()
        model(infer_batch)

    train_s = _median_seconds(train_step, args.steps, args.warmup, device)
    infer_s = _median_seconds(infer_step, max(3, args.steps // 3), 2, device)
    return {
        "model": name,
        "overrides": overrides,
        "unaligned": args.unaligned,
        "device": str(device),
        "threads": args.threads,
        "batch": args.batch,
        "train_samples_per_s": args.batch / train_s,
        "train_step_ms": 1e3 * train_s,
        "infer_batch": args.infer_batch,
        "infer_samples_per_s": args.infer_batch / infer_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*REGISTRY, "all"], default="mdkat")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--unaligned", action="store_true", help="MOSI unaligned steps: 50 / 375 / 500")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    names = list(REGISTRY) if args.model == "all" else [args.model]
    results = [measure(name, args) for name in names]
    if args.json:
        json.dump(results if args.model == "all" else results[0], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for result in results:
            print(
                f"{result['model']} {' '.join(args.overrides)}: train {result['train_samples_per_s']:.1f} "
                f"samples/s (batch {args.batch}), inference {result['infer_samples_per_s']:.1f} samples/s "
                f"(batch {args.infer_batch}), peak RSS {result['peak_rss_mb']:.0f} MB, "
                f"{result['params']:,} parameters"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

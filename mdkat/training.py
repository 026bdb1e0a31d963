"""The one training loop, for every model of the registry.

AdamW; the learning rate is reduced when the validation loss stops falling; gradients are clipped;
training stops early when the validation metric `train.select_on` has not improved for `train.patience`
epochs, and the weights of the best epoch are kept. The test split is never read here.

Two choices of ours against overfitting, measured on the synthetic data (README, "Results"): the inputs
are normalised with the training split's statistics (`fit_input_statistics`), and what is validated and
kept is an exponential moving average of the weights (`train.ema` per step), not the last iterate. With
1,284 samples the iterates jump by several MAE points from one epoch to the next; their average does not,
and early stopping then selects a model, not a lucky step. Weight decay (`train.weight_decay`, decoupled
as in AdamW) is strong by default for the same reason.

The whole split lives on the device (CUDA: moved once, batches indexed there, bf16 autocast; CPU: the
preloaded tensors), so there is no DataLoader. Shuffling draws from a dedicated generator; its state,
the global RNG states, the optimizer, the scheduler and the early-stopping state are checkpointed
atomically after every epoch, so that `resume=True` continues an interrupted run to the same result as
an uninterrupted one. Checkpoints hold only tensors and plain containers (`torch.load(weights_only=True)`).

Under torchrun (`mdkat.distributed`) the same loop runs on every rank: each trains on its shard of every
global batch through DistributedDataParallel, validation is dealt out by batches and gathered back, and
rank 0 alone checkpoints, prints and calls `on_epoch`. In one process nothing of this changes a number.
"""

from __future__ import annotations

import copy
import csv
import io
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mdkat import distributed
from mdkat.config import Params
from mdkat.data import Batch, Prepared
from mdkat.errors import MdkatError
from mdkat.fingerprint import differences, identity
from mdkat.io import atomic_open
from mdkat.metrics import is_better, regression_metrics
from mdkat.models import ModelOutput, build, rebuild
from mdkat.models.encoders import fit_input_statistics

CHECKPOINT = "checkpoint.pt"


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when available (the local rank's GPU under torchrun), else CPU; `cuda` without a GPU
    is an error, not a silent fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise MdkatError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and distributed.launched():
        return torch.device("cuda", local_rank)
    return torch.device(choice)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    # bf16 on the GPU: no loss scaling needed, and the attention kernels run on tensor cores.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def eval_outputs(model: nn.Module, data: Batch, batch_size: int) -> Iterator[tuple[Batch, ModelOutput]]:
    """(batch, output) of `model` in eval mode over `data` in order, on the model's device, no gradients;
    under torchrun each rank takes every `world`-th batch, so that together they cover `data` once."""
    model.eval()
    device = next(model.parameters()).device
    context = distributed.current()
    for start in range(context.rank * batch_size, len(data), context.world * batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, len(data)))).to(device)
        with torch.no_grad(), autocast(device):
            out = model(batch)
        yield batch, out


def predict(model: nn.Module, data: Batch, batch_size: int) -> np.ndarray:
    """Predictions (N,) of `model` in eval mode, in the order of `data` (every rank's, under torchrun)."""
    preds = [out.pred.float() for _, out in eval_outputs(model, data, batch_size)]
    mine = torch.cat(preds).cpu().numpy().astype(np.float64) if preds else np.zeros(0)
    ranks = distributed.gather_objects(mine)
    if len(ranks) == 1:
        return ranks[0]
    # rank r holds batches r, r + world, ...: deal them back into their order
    chunks = [np.array_split(part, range(batch_size, len(part), batch_size)) for part in ranks]
    ordered = [chunks[i % len(ranks)][i // len(ranks)] for i in range(-(-len(data) // batch_size))]
    return np.concatenate(ordered)


def validation_loss(model: nn.Module, data: Batch, batch_size: int, weights: dict[str, float]) -> float:
    """Sample-weighted mean of the total loss over `data` (eval mode), summed over the ranks' batches."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for batch, out in eval_outputs(model, data, batch_size):
        with torch.no_grad(), autocast(device):
            loss, _ = model.loss(out, batch, weights)
        total += loss.float() * len(batch)
    return distributed.sum_over_ranks(total).item() / len(data)


@torch.no_grad()
def _update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of the weights' exponential moving average; buffers (KT's errors) follow the model."""
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), 1.0 - decay)
    for mine, theirs in zip(averaged.buffers(), model.buffers(), strict=True):
        mine.copy_(theirs)


class _Step(nn.Module):
    """`model`'s forward and loss on one batch as one module: DDP reduces the gradients of its output."""

    def __init__(self, model: nn.Module, weights: dict[str, float]):
        super().__init__()
        self.model, self.weights = model, weights

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(self.model(batch), batch, self.weights)


@dataclass
class FitResult:
    """What a finished fit produced."""

    model: nn.Module  # with the best epoch's weights, on the training device
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]]
    stopped_early: bool
    seconds: float


EpochCallback = Callable[[int, dict[str, float]], None]


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_open(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint or model file, loaded safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MdkatError(f"{path}: not found") from None
    except Exception as e:  # a truncated or foreign file: say which
        raise MdkatError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def ensure_same_run(path: str | Path, saved: dict[str, Any], this_run: dict[str, Any]) -> None:
    """A checkpoint `saved` (read from `path`) continues only the run of identity `this_run`."""
    changed = (
        differences(saved["identity"], this_run)
        if "identity" in saved
        else ["the checkpoint records no identity (written by an older version of the pipeline)"]
    )
    if changed:
        raise MdkatError(
            f"{path}: cannot resume a run of another configuration; what differs:\n  "
            + "\n  ".join(changed)
            + "\nRun without --resume to train afresh with the new values."
        )


def check_inputs(
    model: nn.Module, manifest: dict[str, Any], model_file: str | Path, data_dir: str | Path
) -> None:
    """A model file and prepared data agree on feature sizes and alignment, or an error says how not."""
    spec = model.spec
    dims = dict(manifest["dims"])
    expected = dict(spec["dims"])
    if "bert" in spec:  # BERT makes the text features: the file's text size is BERT's, not the data's
        dims.pop("text")
        expected.pop("text")
        if "text_tokens" not in manifest:
            raise MdkatError(f"{model_file} reads text through BERT, but {data_dir} has no word pieces")
    if dims != expected:
        raise MdkatError(
            f"{model_file} was trained on features of sizes {expected} ({spec['model_name']}), "
            f"but {data_dir} has {dims}: evaluate it on data prepared like its training data"
        )
    if bool(manifest["aligned"]) != spec["aligned"]:
        raise MdkatError(
            f"{model_file} was trained on {'aligned' if spec['aligned'] else 'unaligned'} data, "
            f"but {data_dir} is {'aligned' if manifest['aligned'] else 'unaligned'}"
        )


def model_from_file(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model from a `model.pt` written by `fit` (its own config and input dims travel with it)."""
    payload = load_checkpoint(path)
    missing = [k for k in ("model", "model_name", "model_config", "dims", "aligned") if k not in payload]
    if missing:
        raise MdkatError(f"{path}: not a model file of this version of the pipeline (no {missing})")
    model = rebuild(payload, str(path))
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def fit(
    params: Params,
    data: Prepared,
    out_dir: str | Path,
    *,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> FitResult:
    """Train `params.model` on `data.train`, select on `data.valid`; write `model.pt` and `history.csv`.

    `on_epoch(epoch, row)` is called after every epoch with that epoch's history row (`lr`, `train_<term>`,
    `valid_loss`, `valid_<metric>`, `seconds`), after the epoch's checkpoint is saved: a tracker logs
    it, a tuner may raise from it to prune (the checkpoint then resumes after that epoch).

    The checkpoint (in `checkpoint_dir`, default `out_dir`) records the run's identity (parameters, data,
    code: `mdkat.fingerprint`); `resume=True` continues it only when this run's identity is the same, and
    otherwise stops with the list of what differs.
    """
    cfg = params.train
    context = distributed.current()
    progress = progress and context.is_main
    out_dir = Path(out_dir)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, context.local_rank)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    dims, aligned = data.manifest["dims"], bool(data.manifest["aligned"])
    if params.model.text_encoder == "bert" and "text_tokens" not in data.manifest:
        raise MdkatError(
            f"model.text_encoder is 'bert' but the prepared data ({data.manifest.get('source')}) have no "
            "word pieces (text_ids): use mmsa data with text_bert, or model.text_encoder=features"
        )
    sizes = {"train": len(data.train), "valid": len(data.valid)}
    weights = params.weights()
    model = build(params, dims, aligned, sizes)
    fit_input_statistics(model, data.train)  # from the training split only, before any step
    model = model.to(device)
    step = _Step(model, weights)  # the loss inside a module's forward: what DDP hooks its all-reduce into
    if context.world > 1:
        step = DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers are updated from the gathered global batch on every rank
        )  # every parameter gets a gradient every step (tests/test_models.py): no unused-parameter search
    # the weights' moving average is what is validated and kept (the model itself when train.ema is 0)
    averaged = copy.deepcopy(model) if cfg.ema > 0 else model
    optimizer = torch.optim.AdamW(model.parameter_groups(cfg.lr), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    train, valid = data.train.to(device), data.valid.to(device)

    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": [], "best_model": None}
    checkpoint_path = Path(checkpoint_dir or out_dir) / CHECKPOINT
    if context.is_main:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    this_run = identity(params, data.manifest_sha256)
    # rank 0's checkpoint, whatever world size wrote it: other ranks may not see its file system
    saved = (
        load_checkpoint(checkpoint_path) if resume and context.is_main and checkpoint_path.exists() else None
    )
    saved = distributed.from_main(saved)
    if saved is not None:
        ensure_same_run(checkpoint_path, saved, this_run)
        model.load_state_dict(saved["model"])
        if averaged is not model:
            averaged.load_state_dict(saved["averaged"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"], generator)
        state = saved["state"]
        if context.is_main:
            print(f"resuming after epoch {state['epoch']} from {checkpoint_path}", file=sys.stderr)

    start = time.perf_counter()
    stopped_early = False
    n = len(train)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)  # on the CPU; Batch.select moves each slice
        sums: dict[str, torch.Tensor] = {}
        seen = 0  # samples this rank trained on
        bar = tqdm(
            range(0, n, cfg.batch_size),
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            leave=False,
            disable=not progress,
            file=sys.stderr,
        )
        for i, offset in enumerate(bar):
            index = order[offset : offset + cfg.batch_size]
            if len(index) < context.world:  # a last batch too small to give every rank a sample
                continue
            index = distributed.shard(index, context)
            batch = train.select(index)
            with autocast(device):
                total, terms = step(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if averaged is not model:
                _update_average(averaged, model, cfg.ema)
            for name, value in (("loss", total.detach()), *terms.items()):
                sums[name] = sums.get(name, 0.0) + value.float() * len(index)
            seen += len(index)
            if progress and i % 5 == 0:  # reading the loss syncs the device: not every step
                bar.set_postfix(loss=f"{total.item():.4f}")
        bar.close()

        row: dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        seen = int(distributed.sum_over_ranks(torch.tensor(seen, device=device)))
        row.update({f"train_{k}": distributed.sum_over_ranks(v).item() / seen for k, v in sums.items()})
        valid_loss = validation_loss(averaged, valid, cfg.eval_batch_size, weights)
        metrics = regression_metrics(predict(averaged, valid, cfg.eval_batch_size), valid.label.cpu().numpy())
        row["valid_loss"] = valid_loss
        row.update({f"valid_{k}": v for k, v in metrics.items()})
        row["seconds"] = time.perf_counter() - epoch_start
        scheduler.step(valid_loss)

        score = metrics[cfg.select_on]
        if is_better(cfg.select_on, score, state["best"]):
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
            state["best_model"] = {k: v.detach().clone().cpu() for k, v in averaged.state_dict().items()}
            state["best_valid"] = metrics
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(row)
        if not context.is_main:
            continue
        print(
            f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  valid loss {valid_loss:.4f}  "
            f"{cfg.select_on} {score:.4f}  mae {metrics['mae']:.4f}  acc2 {metrics['acc2_non0']:.4f}  "
            f"lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  *" if state["best_epoch"] == epoch else ""),
            file=sys.stderr,
        )
        _save(
            checkpoint_path,
            {
                "model": model.state_dict(),
                **({"averaged": averaged.state_dict()} if averaged is not model else {}),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(generator),
                "state": state,
                "identity": this_run,
            },
        )
        if on_epoch is not None:
            on_epoch(epoch, row)
    else:
        stopped_early = state["bad_epochs"] >= cfg.patience

    if state["best_model"] is None:
        raise MdkatError("training produced no usable epoch (the validation metric was NaN every time)")
    averaged.load_state_dict(state["best_model"])
    if context.is_main:
        _save(out_dir / "model.pt", {"model": state["best_model"], **model.spec})
        _write_history(out_dir / "history.csv", state["history"])
    return FitResult(
        model=averaged,
        best_epoch=state["best_epoch"],
        best_valid=state["best_valid"],
        history=state["history"],
        stopped_early=stopped_early,
        seconds=time.perf_counter() - start,
    )


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    with atomic_open(path) as f:
        f.write(_csv_text(columns, history).encode())


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()

"""Pretraining loop: pull a batch, take an optimizer step, log, evaluate, checkpoint. Repeat.

Readable top to bottom like nanoGPT's train.py. The loop never decides which data comes next: the batch
source (the mixing service's HTTP client, or anything with the same contract) does. The loop only saves
where the source was (its state_dict) next to the model, so a resumed run trains on exactly the batches
an uninterrupted run would have seen. On CPU the resumed losses are bitwise identical.

Single process: train(cfg, batches). Several: `torchrun --nproc_per_node=N your_script.py`, which sets
RANK / LOCAL_RANK / WORLD_SIZE; each rank passes a source that yields only its slice of every batch.
`python -m trainer` / `torchrun -m trainer` (trainer.cli) is this loop wired to the mixing service.
"""

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.model import GPT, GPTConfig, autocast_for


class BatchSource(Protocol):
    """What train() pulls from: an iterator of batches whose position can be saved and restored.

    Each batch is {"input_ids": LongTensor[b, T], "labels": LongTensor[b, T], "step": int (the data
    step), "source_ids": LongTensor[b]}. state_dict() describes the *next* batch, so a checkpoint taken
    after step k resumes at batch k+1. It must hold only plain Python values and tensors: checkpoints are
    loaded with torch.load(weights_only=True).
    """

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    max_steps: int = 1000  # optimizer steps; each consumes one batch from the source
    grad_accum_steps: int = 1  # split each batch into this many micro-batches: same maths, less memory
    # AdamW
    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # schedule: linear warmup, then cosine decay to min_lr at lr_decay_steps (None: at max_steps)
    warmup_steps: int = 100
    lr_decay_steps: int | None = None
    min_lr: float = 6e-5
    # I/O: out_dir/metrics.jsonl and out_dir/ckpt.pt
    out_dir: str = "out"
    eval_interval: int = 250  # in steps; 0: evaluate only at the end
    checkpoint_interval: int = 0  # in steps; 0: checkpoint only at the end
    resume_from: str | None = None  # a ckpt.pt to continue from
    # system
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False  # torch.compile the model (CUDA runs; slow to start)
    seed: int = 1337
    # attention within documents only; needs batches with position_ids (MixerLoader(boundaries=True))
    doc_causal_mask: bool = False


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate for a 0-based step: linear warmup, cosine decay, then flat at min_lr."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def train(
    cfg: TrainConfig,
    batches: BatchSource,
    evaluator: Callable[[GPT], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_eval: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train cfg.model on batches for cfg.max_steps (or until the source runs dry); return model + summary.

    evaluator(model) -> {source: loss} runs on rank 0 every cfg.eval_interval steps and at the end
    (see trainer.evaluate.evaluate). on_step(data_step) runs on every rank after each optimizer step, with
    batch["step"] of the batch just trained on, so a client can tell the service what was consumed.
    progress(record) gets rank 0's metrics record of every step (see trainer.progress.ProgressLine).
    on_eval(data_step, tokens, results) gets every evaluation on rank 0, e.g. to post it to the service's
    overfitting watch (data_step: the last batch trained; -1 before any).
    """
    # -- distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE ---------------------------------
    ddp = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device_type = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
    else:
        device = torch.device(device_type)
    owns_process_group = ddp and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    # -- model and optimizer, fresh or from a checkpoint ------------------------------------------------
    torch.manual_seed(cfg.seed + rank)  # distinct dropout per rank; DDP copies rank 0's initial weights
    raw_model = GPT(cfg.model).to(device)  # unwrapped: what we checkpoint, evaluate and return
    optimizer = raw_model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type
    )
    step, tokens = 0, 0  # optimizer steps completed; tokens trained on, all ranks together
    if cfg.resume_from:
        ckpt = torch.load(cfg.resume_from, map_location="cpu", weights_only=True)
        assert len(ckpt["data"]) == world_size, "resume with the world size the checkpoint was written with"
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, tokens = ckpt["step"], ckpt["tokens"]
        batches.load_state_dict(ckpt["data"][rank])
        _set_rng_state(ckpt["rng"][rank], device)
    model: nn.Module = raw_model
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]  # an OptimizedModule at runtime
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = autocast_for(device)

    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    losses: list[float] = []
    eval_results: dict[str, float] | None = None
    eval_step, data_step = -1, -1
    total_wait = total_time = 0.0
    t_start = time.perf_counter()

    # -- the loop -----------------------------------------------------------------------------------------
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        data_wait = time.perf_counter() - t0  # the data stall: time the accelerator had nothing to do

        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        assert len(batch["input_ids"]) % cfg.grad_accum_steps == 0, "batch must split into grad_accum_steps"
        micro_size = len(batch["input_ids"]) // cfg.grad_accum_steps
        inputs = batch["input_ids"].to(device, non_blocking=True).split(micro_size)
        labels = batch["labels"].to(device, non_blocking=True).split(micro_size)
        positions = _position_ids(batch, cfg, device, micro_size, len(inputs))
        loss_sum = torch.zeros((), device=device)
        for micro_step, (x, y, p) in enumerate(zip(inputs, labels, positions, strict=True)):
            # under DDP, all-reduce gradients once per step (last micro-batch); before that accumulate locally
            sync = not ddp or micro_step == cfg.grad_accum_steps - 1
            with nullcontext() if sync else model.no_sync():  # type: ignore[operator]
                with ctx:
                    _, loss = model(x, y, position_ids=p)
                    loss = loss / cfg.grad_accum_steps
                loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)  # log the whole batch's loss, not one rank's slice
            loss_sum /= world_size
        loss_value = loss_sum.item()  # waits for the accelerator, so step_time_s is honest
        step_time = time.perf_counter() - t0
        step += 1
        tokens += batch["input_ids"].numel() * world_size

        losses.append(loss_value)
        total_wait += data_wait
        total_time += step_time
        if master:
            record = {
                "step": step,
                "data_step": int(batch["step"]),
                "loss": loss_value,
                "lr": lr,
                "tokens": tokens,
                "elapsed": time.perf_counter() - t_start,
                "data_wait_s": data_wait,
                "step_time_s": step_time,
            }
            _append_jsonl(metrics_path, record)
            if progress is not None:
                progress(record)
        if master and evaluator is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            eval_results, eval_step = _evaluate(evaluator, raw_model, step, metrics_path), step
            if on_eval is not None:
                on_eval(int(batch["step"]), tokens, eval_results)
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            _save_checkpoint(ckpt_path, cfg, raw_model, optimizer, step, tokens, batches, device, ddp)
        data_step = int(batch["step"])
        if on_step is not None:
            on_step(data_step)

    # -- the end: final evaluation and checkpoint -------------------------------------------------------
    if master and evaluator is not None and eval_step != step:
        eval_results = _evaluate(evaluator, raw_model, step, metrics_path)
        if on_eval is not None:
            on_eval(data_step, tokens, eval_results)
    _save_checkpoint(ckpt_path, cfg, raw_model, optimizer, step, tokens, batches, device, ddp)
    if owns_process_group:
        dist.barrier()  # no rank tears the group down while a peer is still in a collective (gloo aborts)
        dist.destroy_process_group()
    return {
        "model": raw_model,
        "step": step,
        "tokens": tokens,
        "losses": losses,  # per step of this call, rank-averaged
        "eval": eval_results,  # the last evaluation (rank 0 only)
        "data_wait_s": total_wait,
        "train_time_s": total_time,
        "data_stall_frac": total_wait / total_time if total_time else 0.0,
    }


def _position_ids(
    batch: dict[str, Any], cfg: TrainConfig, device: torch.device, micro_size: int, micro_steps: int
) -> list[torch.Tensor | None]:
    """Per micro-batch position ids when training with intra-document masking, else ``None`` each."""
    if not cfg.doc_causal_mask:
        return [None] * micro_steps
    if "position_ids" not in batch:
        raise ValueError("doc_causal_mask: batches carry no position_ids; "
                         "read them with MixerLoader(..., boundaries=True)")
    return list(batch["position_ids"].to(device, non_blocking=True).split(micro_size))


def load_model(path: str, device: str = "cpu") -> GPT:
    """The model from a train() checkpoint, e.g. to finetune it in another process."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ckpt["config"]["model"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model


def _evaluate(
    evaluator: Callable[[GPT], dict[str, float]], model: GPT, step: int, metrics_path: str
) -> dict[str, float]:
    t0 = time.perf_counter()
    results = evaluator(model)
    _append_jsonl(metrics_path, {"step": step, "eval": results, "eval_time_s": time.perf_counter() - t0})
    return results


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    """One JSON object per line, flushed at once so dashboards can tail the file during the run."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _save_checkpoint(
    path: str,
    cfg: TrainConfig,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    step: int,
    tokens: int,
    batches: BatchSource,
    device: torch.device,
    ddp: bool,
) -> None:
    """Everything a resumed run needs to continue bit for bit, written atomically by rank 0.

    RNG state and data position differ per rank, so every rank contributes its own (a collective call).
    Writing to a temp file and renaming means a crash mid-write leaves the previous checkpoint intact.
    """
    rng, data = _rng_state(device), batches.state_dict()
    rngs, datas = (_gather(rng), _gather(data)) if ddp else ([rng], [data])
    if ddp and dist.get_rank() != 0:
        return
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,  # the schedule is a pure function of it: get_lr(step, cfg)
        "tokens": tokens,
        "rng": rngs,  # indexed by rank
        "data": datas,
        "config": asdict(cfg),
    }
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

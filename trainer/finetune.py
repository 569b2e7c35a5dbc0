"""Phase two of SPT: finetune on domain data only, and stop when held-out domain loss stops falling.

The paper finetunes both the standard and the SPT model this way (the small domain set repeated for
several epochs, lr from the grid {1e-5, 4e-5, 1e-4}) and compares their best domain loss. Domain loss
overfits after a few epochs, so the result is the best epoch, not the last; web loss is tracked next to
it to measure forgetting.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainer.evaluate import evaluate
from trainer.model import GPT, autocast_for

Batch = dict[str, torch.Tensor]  # {"input_ids": LongTensor[b, T], "labels": LongTensor[b, T], ...}


@dataclass
class FinetuneConfig:
    learning_rate: float = 4e-5  # constant; the paper's grid is {1e-5, 4e-5, 1e-4}
    max_epochs: int = 10
    patience: int = 1  # epochs without a new best domain loss before stopping
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    domain_split: str = "domain"  # the validation split that decides early stopping
    eval_batch_size: int = 32


def epoch_batches(seqs: torch.Tensor, batch_size: int, seed: int = 0) -> Callable[[int], Iterator[Batch]]:
    """An epoch factory over domain sequences LongTensor[n, T+1]: a new, reproducible shuffle per epoch."""

    def epoch(index: int) -> Iterator[Batch]:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + index))
        for batch in seqs[order].split(batch_size):
            yield {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    return epoch


def finetune(
    model: GPT,
    epochs: Callable[[int], Iterable[Batch]],
    val: dict[str, torch.Tensor],
    cfg: FinetuneConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Finetune model in place on epochs(0), epochs(1), ... and leave it at its best epoch.

    val holds the validation splits (see evaluate); cfg.domain_split picks the one to early-stop on.
    Returns {"history": [{"epoch": 0, "domain": .., "web": ..}, {"epoch": 1, "train_loss": .., ...}, ...],
    "best_epoch": int, "best": history[best_epoch]}. Epoch 0 is the model before finetuning, so a
    finetune that never helps returns the model unchanged. on_epoch(history entry) runs after each epoch,
    so a person waiting sees progress.
    """
    device = next(model.parameters()).device
    ctx = autocast_for(device)
    optimizer = model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type
    )
    history: list[dict[str, float]] = [{"epoch": 0, **evaluate(model, val, cfg.eval_batch_size)}]
    best_epoch, best_state = 0, _copy_state(model)
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        train_losses = []
        for batch in epochs(epoch - 1):
            with ctx:
                _, loss = model(batch["input_ids"].to(device), batch["labels"].to(device))
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_losses.append(loss.item())
        train_loss = sum(train_losses) / len(train_losses)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **evaluate(model, val, cfg.eval_batch_size)}
        )
        if on_epoch is not None:
            on_epoch(history[-1])

        if history[epoch][cfg.domain_split] < history[best_epoch][cfg.domain_split]:
            best_epoch, best_state = epoch, _copy_state(model)
        elif epoch - best_epoch >= cfg.patience:
            break  # overfitting: the domain set has been repeated too often
    model.load_state_dict(best_state)
    return {"history": history, "best_epoch": best_epoch, "best": history[best_epoch]}


def _copy_state(model: GPT) -> dict[str, torch.Tensor]:
    """A snapshot on CPU, so keeping the best epoch costs no accelerator memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

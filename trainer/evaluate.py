"""Held-out loss per data source.

SPT is judged on two numbers, not one: domain loss (did the repeated domain data help?) and web loss
(how much general knowledge was lost?). So evaluation keeps the sources apart and reports each as a mean
over tokens, comparable across runs with different batch sizes and mixtures.
"""

import torch

from trainer.model import GPT, autocast_for


@torch.no_grad()
def evaluate(model: GPT, splits: dict[str, torch.Tensor], batch_size: int = 32) -> dict[str, float]:
    """Mean next-token loss per token for each split, e.g. {"domain": 2.91, "web": 3.40}.

    Each split is a LongTensor[n, T+1] of validation sequences: inputs are [:, :-1], targets [:, 1:].
    Use it in train() as evaluator=functools.partial(evaluate, splits=val, batch_size=...).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the same weights always give the same number
    results = {}
    for name, seqs in splits.items():
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_tokens = 0
        for batch in seqs.split(batch_size):
            batch = batch.to(device)
            with autocast_for(device):
                _, loss = model(batch[:, :-1], batch[:, 1:], reduction="none")
            loss_sum += loss.double().sum()  # float64: sums over many tokens stay exact enough to compare
            n_tokens += loss.numel()
        results[name] = (loss_sum / n_tokens).item()
    model.train(was_training)
    return results

"""Trainer tests on CPU: learning, bitwise resume, metrics, per-source eval, finetune, DDP (gloo)."""

import functools
import io
import json
import math
import os
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from trainer.evaluate import evaluate
from trainer.finetune import FinetuneConfig, epoch_batches, finetune
from trainer.model import GPT, GPTConfig
from trainer.progress import ProgressLine
from trainer.train import TrainConfig, get_lr, load_model, train

VOCAB, SEQ_LEN = 256, 32


def make_corpus(n_tokens: int, seed: int) -> torch.Tensor:
    """Tokens built from a fixed table of random 8-token phrases: learnable, unlike uniform noise."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, VOCAB, (64, 8), generator=g)
    return phrases[torch.randint(0, 64, (n_tokens // 8,), generator=g)].flatten()


class TokenStream:
    """A real batch source over fixed corpora: batch k is a pure function of (seed, rank, k).

    Implements the contract train() expects from the HTTP client: an iterator of batch dicts plus
    state_dict()/load_state_dict() holding the next data step. ranks=(0, 1) yields the concatenation of
    what ranks 0 and 1 of a DDP run see, i.e. the global batch.
    """

    def __init__(
        self, corpora: list[torch.Tensor], batch_size: int, seed: int = 0, ranks: tuple[int, ...] = (0,)
    ) -> None:
        self.corpora, self.batch_size, self.seed, self.ranks = corpora, batch_size, seed, ranks
        self.step = 0

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> dict[str, Any]:
        seqs, source_ids = zip(*(self._rank_slice(rank) for rank in self.ranks), strict=True)
        seq = torch.cat(seqs)
        batch = {
            "input_ids": seq[:, :-1],
            "labels": seq[:, 1:],
            "step": self.step,
            "source_ids": torch.cat(source_ids),
        }
        self.step += 1
        return batch

    def _rank_slice(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 101 + rank)
        source_ids = torch.randint(0, len(self.corpora), (self.batch_size,), generator=g)
        seqs = []
        for source in source_ids.tolist():
            corpus = self.corpora[source]
            start = int(torch.randint(0, len(corpus) - SEQ_LEN - 1, (1,), generator=g))
            seqs.append(corpus[start : start + SEQ_LEN + 1])
        return torch.stack(seqs), source_ids

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


@pytest.fixture(scope="module")
def corpora() -> dict[str, torch.Tensor]:
    return {"web": make_corpus(20_000, seed=1), "domain": make_corpus(4_000, seed=2)}


@pytest.fixture(scope="module")
def val_splits(corpora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Held-out windows of each corpus, LongTensor[n, T+1], as evaluate() expects."""
    return {name: c[: 16 * (SEQ_LEN + 1)].view(16, SEQ_LEN + 1) for name, c in corpora.items()}


def small_config(out_dir: str, **overrides: Any) -> TrainConfig:
    model = GPTConfig.from_preset("gpt-1m", vocab_size=VOCAB, block_size=SEQ_LEN)
    defaults: dict[str, Any] = dict(
        model=model,
        max_steps=30,
        learning_rate=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        out_dir=out_dir,
        eval_interval=10,
        device="cpu",
    )
    return TrainConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def pretrained(corpora, val_splits, tmp_path_factory) -> tuple[dict[str, Any], str]:
    """One ~1M-param, 30-step run shared by the tests that only inspect its results."""
    out_dir = str(tmp_path_factory.mktemp("pretrain"))
    evaluator = functools.partial(evaluate, splits=val_splits, batch_size=8)
    reported: list[int] = []
    result = train(
        small_config(out_dir),
        TokenStream([corpora["web"], corpora["domain"]], batch_size=8),
        evaluator,
        reported.append,
    )
    result["reported"] = reported
    return result, out_dir


def test_model_presets_span_cpu_to_gpt2_small() -> None:
    assert 0.5e6 < GPT(GPTConfig.from_preset("gpt-1m")).num_params() < 1.5e6
    with torch.device("meta"):  # no memory for the big one
        assert GPT(GPTConfig.from_preset("gpt-124m")).num_params() >= 100e6


def test_per_token_loss_matches_mean() -> None:
    model = GPT(GPTConfig.from_preset("gpt-tiny"))
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, idx)
    _, per_token = model(idx, idx, reduction="none")
    assert logits.shape == (3, 16, 256) and per_token.shape == (3, 16)
    assert torch.allclose(per_token.mean(), loss)


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [get_lr(s, cfg) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=True))  # cosine falls
    assert lrs[100] == lrs[119] == 1e-4


def test_loss_decreases(pretrained) -> None:
    result, _ = pretrained
    losses = result["losses"]
    assert len(losses) == 30 and result["step"] == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result["reported"] == list(range(30))  # on_step got each trained data step
    assert result["tokens"] == 30 * 8 * SEQ_LEN
    assert 0.0 <= result["data_stall_frac"] < 1.0


def test_metrics_jsonl_is_well_formed(pretrained) -> None:
    _, out_dir = pretrained
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    keys = {"step", "data_step", "loss", "lr", "tokens", "elapsed", "data_wait_s", "step_time_s"}
    for r in steps:
        assert keys <= r.keys() and math.isfinite(r["loss"]) and 0 <= r["data_wait_s"] <= r["step_time_s"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(set(r["eval"]) == {"web", "domain"} for r in evals)
    assert len(records) == 33


def test_evaluate_per_source(pretrained, val_splits) -> None:
    model = pretrained[0]["model"]
    results = evaluate(model, val_splits, batch_size=5)  # 16 sequences: uneven last batch on purpose
    assert set(results) == {"web", "domain"}
    with torch.no_grad():
        for name, seqs in val_splits.items():
            _, loss = model.eval()(seqs[:, :-1], seqs[:, 1:])
            assert results[name] == pytest.approx(loss.item(), rel=1e-5)
    assert results == pytest.approx(pretrained[0]["eval"])  # the final eval train() logged


def test_resume_is_bitwise_identical(corpora, tmp_path) -> None:
    """Interrupted at step 4 and resumed == uninterrupted, with dropout and grad accumulation on."""
    sources = [corpora["web"], corpora["domain"]]
    overrides = dict(max_steps=8, grad_accum_steps=2, checkpoint_interval=4, eval_interval=0)
    model = GPTConfig.from_preset("gpt-1m", vocab_size=VOCAB, block_size=SEQ_LEN, n_layer=2, dropout=0.1)
    full = train(small_config(str(tmp_path / "full"), model=model, **overrides), TokenStream(sources, 4))

    def crash_after_step_4(data_step: int) -> None:
        if data_step == 3:
            raise KeyboardInterrupt

    cfg = small_config(str(tmp_path / "run"), model=model, **overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, TokenStream(sources, 4), on_step=crash_after_step_4)
    ckpt_path = str(tmp_path / "run" / "ckpt.pt")
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "metrics.jsonl"]  # no temp file left behind
    cfg.resume_from = ckpt_path
    resumed = train(cfg, TokenStream(sources, 4))

    assert resumed["losses"] == full["losses"][4:]
    resumed_params = resumed["model"].state_dict()
    for name, param in full["model"].state_dict().items():
        assert torch.equal(param, resumed_params[name]), name
    assert torch.equal(load_model(ckpt_path).lm_head.weight, full["model"].lm_head.weight)


def test_finetune_early_stops_and_keeps_best(corpora, val_splits) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt-tiny", block_size=SEQ_LEN))
    # a tiny domain set learned with a large lr overfits within a few epochs
    domain_train = corpora["domain"][-8 * (SEQ_LEN + 1) :].view(8, SEQ_LEN + 1)
    cfg = FinetuneConfig(learning_rate=1e-2, max_epochs=30, patience=2, eval_batch_size=16)
    out = finetune(model, epoch_batches(domain_train, batch_size=4), val_splits, cfg)

    history = out["history"]
    assert 0 < out["best_epoch"] < len(history) - 1 < cfg.max_epochs  # improved, then stopped early
    assert len(history) - 1 == out["best_epoch"] + cfg.patience
    assert all({"epoch", "domain", "web"} <= h.keys() for h in history)
    assert out["best"]["domain"] == min(h["domain"] for h in history)
    assert evaluate(model, val_splits, batch_size=16)["domain"] == pytest.approx(out["best"]["domain"])


def ddp_config(out_dir: str, grad_accum_steps: int) -> TrainConfig:
    model = GPTConfig.from_preset("gpt-tiny", block_size=SEQ_LEN)
    return TrainConfig(
        model=model,
        max_steps=3,
        warmup_steps=0,
        learning_rate=1e-2,
        out_dir=out_dir,
        eval_interval=0,
        device="cpu",
        grad_accum_steps=grad_accum_steps,
    )


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    source = TokenStream([make_corpus(4_000, seed=3)], batch_size=4, ranks=(rank,))  # each rank its own slice
    result = train(ddp_config(out_dir, grad_accum_steps=2), source)
    torch.save(result["model"].state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_params_in_sync(tmp_path) -> None:
    """Two gloo ranks on different data end with identical params, equal to one process on both slices."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    global_batch = TokenStream([make_corpus(4_000, seed=3)], batch_size=4, ranks=(0, 1))
    single = train(ddp_config(str(tmp_path / "single"), grad_accum_steps=4), global_batch)
    single_params = single["model"].state_dict()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        # fp32 sums in another order differ in the last bits, and Adam divides by sqrt(v), so a weight
        # may move by a few 1e-5 after 3 steps at lr 1e-2; 1e-4 is 1% of one step, far below a real bug
        assert torch.allclose(rank0[name], single_params[name], atol=1e-4), name
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and [d["step"] for d in ckpt["data"]] == [3, 3] and len(ckpt["rng"]) == 2


def test_document_mask_models_each_document_on_its_own() -> None:
    """With position_ids restarting at a document start, no token sees across the boundary: the logits
    of a packed row equal those of each document run alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt-tiny", block_size=SEQ_LEN)).eval()
    first, second = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 13))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(13)]).expand(2, 20)
    with torch.no_grad():
        logits, _ = model(packed, position_ids=positions)
        assert torch.allclose(logits[:, :7], model(first)[0], atol=1e-5)
        assert torch.allclose(logits[:, 7:], model(second)[0], atol=1e-5)
        assert not torch.allclose(model(packed)[0][:, 7:], model(second)[0], atol=1e-3)  # unmasked differs
        assert torch.equal(model(packed, position_ids=torch.arange(20).expand(2, 20))[0], model(packed)[0])


class WithPositions(TokenStream):
    """TokenStream rows cut into documents every 8 tokens, as the loader's boundaries would say."""

    def __next__(self) -> dict[str, Any]:
        batch = super().__next__()
        return batch | {"position_ids": (torch.arange(SEQ_LEN) % 8).expand(len(batch["input_ids"]), SEQ_LEN)}


def test_training_with_the_document_mask(corpora, tmp_path) -> None:
    sources = [corpora["web"], corpora["domain"]]
    cfg = small_config(str(tmp_path / "a"), max_steps=6, eval_interval=0, doc_causal_mask=True,
                       grad_accum_steps=2)
    masked = train(cfg, WithPositions(sources, 4))
    plain = train(small_config(str(tmp_path / "b"), max_steps=6, eval_interval=0), WithPositions(sources, 4))
    assert all(math.isfinite(x) for x in masked["losses"]) and masked["losses"] != plain["losses"]
    with pytest.raises(ValueError, match="boundaries=True"):
        train(small_config(str(tmp_path / "c"), max_steps=1, doc_causal_mask=True), TokenStream(sources, 4))


def test_progress_line_reports_rates_stall_and_repetition() -> None:
    out, now = io.StringIO(), [100.0]
    line = ProgressLine(10, interval_s=5.0, describe=lambda step: f"abc seen {step / 10:.2f}x", out=out,
                        clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 1.0
        line({"step": step, "data_step": step - 1, "loss": 5.0 / step, "tokens": 1000 * step,
              "data_wait_s": 0.25, "step_time_s": 1.0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and line.lines == 2  # every 5 s, and always the last step
    assert lines[0] == "step 5/10  loss 1.000  1.0k tok/s  data stall 25.0%  abc seen 0.40x  eta 5s"
    assert lines[1].startswith("step 10/10  loss 0.500  1.0k tok/s") and lines[1].endswith("eta 0s")

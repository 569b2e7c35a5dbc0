"""A GPT language model in the style of nanoGPT: one file, one config, no framework.

The model exists so the mixing service can be tested end to end (does a δ-mixture change domain
and web loss the way the SPT paper says?), so it stays small and plain: pre-norm transformer blocks,
tied input/output embeddings and PyTorch's fused attention kernel.
"""

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # label value that contributes no loss (padding, document masks)


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # no biases in Linear/LayerNorm: slightly better and faster when training from scratch

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Named sizes so tests, demos and real runs talk about the same models."""
        return cls(**{**PRESETS[name], **overrides})


# Approximate parameter counts (embeddings included) in the names; vocab/block size can be overridden.
PRESETS: dict[str, dict[str, int]] = {
    "gpt-tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256),
    "gpt-1m": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=1024),
    "gpt-12m": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=4096),
    "gpt-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
}


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA only: CPU runs stay in fp32 so they are exact and reproducible."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool block-diagonal causal mask: query i sees key j iff j <= i in the same document.

    Documents start where ``position_ids`` is 0. A dense boolean mask works with SDPA on every device
    (it is the CPU path); on GPUs the same information as ``cu_seqlens`` drives varlen flash attention.
    """
    doc = torch.cumsum(position_ids == 0, dim=1)  # (B, T) document index within the row
    T = position_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``doc_mask`` (B, 1, T, T) bool, True where a query may attend: replaces the plain causal mask."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # flash attention when the backend has it: never materialises the (T, T) attention matrix
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=doc_mask, dropout_p=dropout_p, is_causal=doc_mask is None
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), doc_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input and output embeddings share one matrix (fewer params, better small models)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count; the tied embedding matrix is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the cross-entropy loss.

        reduction="none" returns the loss per token, shape (B, T), so callers can average it per data
        source (domain vs web) instead of per batch; positions labelled IGNORE_INDEX get loss 0.
        position_ids (B, T), restarting at 0 where a document starts (the loader's, with boundaries),
        turn on intra-document causal attention: no token attends across a document boundary, and
        position embeddings count from each document's start, so each document is modelled on its own.
        """
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence length {T} > block_size {self.config.block_size}"
        doc_mask = None
        if position_ids is None:
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        else:
            pos, doc_mask = position_ids, document_causal_mask(position_ids)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x, doc_mask)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        if reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on matrices only (matmul weights, embeddings).

        Decaying biases and LayerNorm gains only pulls them towards zero for no benefit.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused CUDA kernel is faster; on CPU the plain implementation keeps runs bitwise reproducible
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

"""Validation: mean next-token loss and top-1 accuracy of the engine's model over validation windows."""

from __future__ import annotations

import torch

from distlip.distributed.engine import Engine
from distlip.loss import chunk_tokens, head_loss_and_correct
from distlip.memory import micro_batch_size


@torch.no_grad()
def evaluate(engine: Engine, vx: torch.Tensor, vy: torch.Tensor, autocast, max_windows: int = 0,
             batch: int = 0) -> tuple[float, float]:
    """Mean next-token loss and top-1 accuracy over validation windows (all, or an evenly
    spaced fixed subset of `max_windows`); each rank evaluates every world_size-th window.
    `batch` windows per forward (0: the training micro-batch), their logits
    `train.logits_chunk_mib` at a time, so memory does not grow with the number of windows."""
    engine.model.eval()
    cfg = engine.cfg
    if 0 < max_windows < len(vx):
        idx = torch.linspace(0, len(vx) - 1, max_windows).round().long()
        vx, vy = vx[idx], vy[idx]
    vx, vy = vx[engine.env.rank::engine.env.world_size], vy[engine.env.rank::engine.env.world_size]
    batch = batch or micro_batch_size(cfg, engine.env.world_size)
    chunk = chunk_tokens(cfg.train.logits_chunk_mib, cfg.model.vocab_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    correct = torch.zeros((), dtype=torch.int64, device=engine.device)
    for i in range(0, len(vx), batch):
        x, y = vx[i:i + batch].to(engine.device), vy[i:i + batch].to(engine.device)
        with autocast:
            loss, hits = head_loss_and_correct(engine.hidden(x), engine.model.head.weight, y, cfg.model.logit_scale,
                                               cfg.model.vocab_size, chunk)
        loss_sum += loss
        correct += hits
    engine.model.train()
    loss_total, hits_total, count = engine.all_sum([loss_sum.item(), correct.item(), vy.numel()])
    return loss_total / count, hits_total / count

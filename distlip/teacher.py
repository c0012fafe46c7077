"""Distillation: a model trained on a teacher's predictions as well as on the text.

`train.teacher: PATH` names a trained model (run directory, checkpoint or export) or an ensemble
directory (`distlip ensemble`). Before training, the teacher predicts every token of the
training split once (`soft_targets`); each step the loss is
(1 − α)·CE(text) + α·CE(teacher's distribution), α = `train.teacher_weight` (Hinton, Vinyals and
Dean, 2015, "Distilling the Knowledge in a Neural Network", at temperature 1).

The student's certificate is its own: it comes from the student's weights under its caps, and the
teacher (which need not be certified) changes only what the student is trained to predict. This
is how an ensemble's accuracy (several models, each certified) can be sought in one model at one
model's certified bound.

The teacher reads the text in windows of its context T overlapping by half: each token is
predicted from at least T/2 tokens before it (all of them in the first window), as the student
sees most tokens of its own random windows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distlip.checkpoint.state import open_model
from distlip.ensemble import is_ensemble, load_ensemble
from distlip.errors import ConfigError
from distlip.robustness_report import attention_mask

# (B, T) token ids → (B, T, V) logits at the temperature the teacher was trained at
Teacher = Callable[[torch.Tensor], torch.Tensor]


def open_teacher(path: str | Path, tokenizer) -> tuple[Teacher, int]:
    """The teacher at `path` as a function of token ids, and its context length; one ConfigError
    when it was trained on another tokenizer than the student's data (`tokenizer`)."""
    if is_ensemble(path):
        ensemble, _ = load_ensemble(path)
        first = ensemble.members[0]
        tok, seq_len = first.tokenizer, first.cfg.seq_len()

        def predict(ids: torch.Tensor) -> torch.Tensor:
            return ensemble.temperature * ensemble(ids)
    else:
        model, cfg, tok, _ = open_model(path)
        model.eval()
        seq_len, tau = cfg.seq_len(), cfg.train.loss_temperature

        def predict(ids: torch.Tensor) -> torch.Tensor:
            return tau * model(ids, attention_mask(cfg, tok, ids))
    if tok.to_dict() != tokenizer.to_dict():
        raise ConfigError(f"train.teacher '{path}' was trained with another tokenizer than this run's data: a "
                          "teacher predicts over the student's vocabulary; use a teacher trained on the same text")
    return predict, seq_len


@torch.no_grad()
def soft_targets(predict: Teacher, tokens: np.ndarray, seq_len: int, vocab: int, batch: int = 16) -> torch.Tensor:
    """(N, vocab) float16: row i the teacher's distribution of token i given the tokens before
    it (row 0, which no window predicts, is zero). Windows of `seq_len` start every seq_len/2
    tokens (the last one ends at the split's end); each writes the rows no earlier window wrote."""
    n = len(tokens)
    if n < seq_len + 1:
        raise ConfigError(f"the training split has {n} tokens, fewer than one window of the teacher's context "
                          f"{seq_len}; use more text or a teacher with a shorter context")
    ids = torch.from_numpy(np.ascontiguousarray(tokens)).long()
    starts = list(range(0, n - seq_len, max(1, seq_len // 2)))
    if starts[-1] != n - 1 - seq_len:
        starts.append(n - 1 - seq_len)
    out = torch.zeros(n, vocab, dtype=torch.float16)
    written = 0  # rows 1 … written are done
    offsets = torch.arange(seq_len)
    for i in range(0, len(starts), batch):
        s = torch.tensor(starts[i:i + batch])
        probs = torch.softmax(predict(ids[s[:, None] + offsets]).float()[..., :vocab], dim=-1)
        for start, p in zip(s.tolist(), probs):
            first = max(written + 1, start + 1)  # window `start` predicts tokens start+1 … start+seq_len
            out[first:start + seq_len + 1] = p[first - start - 1:].half()
            written = start + seq_len
    return out

"""The Lipschitz certificate (docs/method.md#certificate), recomputed from the weights themselves.

Norm: max over tokens of the per-token RMS. Matrix norms are RMS→RMS operator norms
‖W‖ = √(d_in/d_out)·σ₁(W). `exact_norms` uses float64 SVD (the oracle, for checkpoints and
the end of training); `SigmaEstimator` gives a cheap per-step estimate by warm-started power
iteration with persistent seeded vectors (identical on every replica).

One correction to the published recipe: the MLP's activation GELU/1.1289 is exactly
1-Lipschitz, so the MLP block constant is ‖W_out‖·‖W_in‖. The 1/1.1289 factor belongs only to
the *magnitude* bound r (|GELU(x)| ≤ |x|), not to the Lipschitz constant.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from distlip.config import ModelConfig
from distlip.lipschitz.constraints import power_iteration
from distlip.model import ATTN_OUT_SCALE, GELU_MAX_SLOPE

CAP_RTOL = 1e-3  # a matrix "exceeds its cap" when σ > cap·(1 + CAP_RTOL)


def rms_operator_norm(sigma: float, shape) -> float:
    """σ₁ of a (d_out, d_in) matrix → its RMS→RMS operator norm."""
    return sigma * math.sqrt(shape[1] / shape[0])


@torch.no_grad()
def exact_norms(matrices: dict[str, torch.Tensor]) -> dict[str, float]:
    """RMS→RMS norms by float64 SVD: the oracle."""
    return {n: rms_operator_norm(torch.linalg.matrix_norm(w.detach().double(), ord=2).item(), w.shape)
            for n, w in matrices.items()}


@torch.no_grad()
def embed_rms_max(embed: torch.Tensor) -> float:
    """Largest token-vector RMS of a (vocab, d) embedding: its ℓ1→RMS norm."""
    return embed.detach().double().pow(2).mean(dim=1).sqrt().max().item()


class SigmaEstimator:
    """Per-step σ₁ estimates by power iteration, one persistent vector per matrix.

    Vectors are seeded from (seed, name) with a private generator, so all replicas agree.
    Power iteration approaches σ₁ from below: this is an estimate; `exact_norms` is the check.
    """

    def __init__(self, iters: int = 2, seed: int = 0):
        self.iters, self.seed = iters, seed
        self.vectors: dict[str, torch.Tensor] = {}

    def _init(self, name: str, w: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(w.shape[1], generator=g, dtype=torch.float32).to(w.device)

    @torch.no_grad()
    def __call__(self, matrices: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {}
        for name, w in matrices.items():
            fresh = name not in self.vectors
            v = self.vectors[name] if not fresh else self._init(name, w)
            sigma, _, v = power_iteration(w.detach().float(), v, self.iters * (10 if fresh else 1))
            self.vectors[name] = v
            out[name] = rms_operator_norm(float(sigma), w.shape)
        return out

    def state_dict(self) -> dict:
        return {"vectors": {n: v.cpu() for n, v in self.vectors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.vectors = {n: v.clone() for n, v in state["vectors"].items()}


@dataclass
class Certificate:
    """Whole-network bound. `bound` maps token ids → logits (includes the embedding);
    `network_bound` maps embeddings with per-token RMS ≤ 1 → logits."""

    bound: float
    log10_bound: float
    network_bound: float
    embed: float
    head: float
    blocks: list = field(default_factory=list)  # per layer: {"attn": L_att, "mlp": L_mlp, "r_in": r}
    norms: dict = field(default_factory=dict)
    max_cap_ratio: float = 0.0  # max over capped matrices of ‖W‖/cap (≤ 1 + CAP_RTOL when certified)

    def violations(self, caps: dict[str, float | None]) -> list[str]:
        return [n for n, c in caps.items() if c is not None and self.norms[n] > c * (1 + CAP_RTOL)]


def certify(norms: dict[str, float], embed: float, cfg: ModelConfig,
            caps: dict[str, float | None] | None = None) -> Certificate:
    """Compose the bound from RMS→RMS matrix norms (names as in the model) and the embedding's
    largest token RMS. The activation-magnitude bound r starts at 1 (token vectors RMS ≤ 1)."""
    alpha, s = 1.0 / (2 * cfg.n_layers), cfg.attn_scale
    r, log_net, blocks = 1.0, 0.0, []
    for i in range(cfg.n_layers):
        n = lambda key: norms[f"blocks.{i}.{key}.weight"]  # noqa: E731
        wq, wk, wv, wo = n("attn.q"), n("attn.k"), n("attn.v"), n("attn.o")
        w_in, w_out = n("mlp.fc_in"), n("mlp.fc_out")
        l_att = ATTN_OUT_SCALE * wo * (wv + 2 * s * wv * r * r * wq * wk)
        r_in = r
        r = (1 - alpha) * r + alpha * ATTN_OUT_SCALE * wo * wv * r
        l_mlp = w_out * w_in  # GELU/GELU_MAX_SLOPE is 1-Lipschitz
        r = (1 - alpha) * r + alpha * (w_out * w_in / GELU_MAX_SLOPE) * r
        log_net += math.log10((1 - alpha) + alpha * l_att) + math.log10((1 - alpha) + alpha * l_mlp)
        blocks.append({"attn": l_att, "mlp": l_mlp, "r_in": r_in})
    head = norms["head.weight"] * abs(cfg.logit_scale)
    log_head = math.log10(head) if head > 0 else -math.inf
    log_embed = math.log10(embed) if embed > 0 else -math.inf
    log_net_total = log_net + log_head
    log_bound = log_embed + log_net_total
    ratios = [norms[k] / c for k, c in (caps or {}).items() if c]
    return Certificate(
        bound=_pow10(log_bound), log10_bound=log_bound, network_bound=_pow10(log_net_total),
        embed=embed, head=head, blocks=blocks, norms=dict(norms), max_cap_ratio=max(ratios, default=0.0))


def _pow10(x: float) -> float:
    return 0.0 if x == -math.inf else (math.inf if x > 308 else 10.0 ** x)

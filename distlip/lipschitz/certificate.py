"""The Lipschitz certificate, recomputed from the weights themselves (derivation: docs/certificate.md).

Norm: max over tokens of the per-token RMS. Matrix norms are RMS→RMS operator norms
‖W‖ = √(d_in/d_out)·σ₁(W). W_q, W_k and W_v enter per head: head h's row block (d_head, d) has
its own norm, and one head can read up to √H times the whole matrix's norm, so whole-matrix
norms alone do not bound multi-head attention. `exact_norms` uses float64 SVD (the oracle, for
checkpoints and the end of training); `SigmaEstimator` gives a cheap per-step estimate by
warm-started power iteration with persistent seeded vectors (identical on every replica).

Norm tables map a matrix name to its norm and, for W_q, W_k, W_v, `block_key(name, h)` to head
h's block norm. A table without the blocks is still certified soundly: each block's norm is
then bounded by √H times the whole matrix's.

The MLP's activation GELU/1.1289 is exactly 1-Lipschitz, so the MLP block constant is
‖W_out‖·‖W_in‖; the 1/1.1289 factor belongs only to the *magnitude* bound r (|GELU(x)| ≤ |x|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from distlip.config.schema import Config, ModelConfig
from distlip.lipschitz.caps import unit_caps
from distlip.lipschitz.spectral import power_iteration, start_vector
from distlip.model import ATTN_OUT_SCALE, GELU_MAX_SLOPE, block_key, head_blocks, padded_vocab

CAP_RTOL = 1e-3  # a matrix "exceeds its cap" when σ > cap·(1 + CAP_RTOL)


def rms_operator_norm(sigma: float, shape) -> float:
    """σ₁ of a (d_out, d_in) matrix → its RMS→RMS operator norm."""
    return sigma * math.sqrt(shape[1] / shape[0])


def norm_units(matrices: dict[str, torch.Tensor], n_heads: int | None) -> dict[str, torch.Tensor]:
    """Every matrix whose norm the certificate reads: each matrix (d_out, d_in) by its name and,
    with `n_heads`, W_q/W_k/W_v's head blocks as one (H, d_head, d_in) tensor per matrix."""
    out = {}
    for name, w in matrices.items():
        out[name] = w
        H = head_blocks(name, n_heads) if n_heads else 1
        if H > 1:
            out[name + "[*]"] = w.reshape(H, w.shape[0] // H, w.shape[1])
    return out


def norm_keys(names: list[str], n_heads: int | None) -> list[str]:
    """The keys `exact_norms(…, n_heads)` returns for matrices `names`, in order."""
    keys = []
    for name in names:
        keys.append(name)
        H = head_blocks(name, n_heads) if n_heads else 1
        keys += [block_key(name, h) for h in range(H)] if H > 1 else []
    return keys


def _table(units: dict[str, torch.Tensor], sigmas: dict[str, torch.Tensor]) -> dict[str, float]:
    """σ₁ per unit (a scalar, or (H,) for head blocks) → RMS→RMS norms keyed as `norm_keys`."""
    out = {}
    for key, w in units.items():
        if key.endswith("[*]"):
            name = key[:-3]
            out.update({block_key(name, h): rms_operator_norm(float(s), w.shape[1:])
                        for h, s in enumerate(sigmas[key].reshape(-1).tolist())})
        else:
            out[key] = rms_operator_norm(float(sigmas[key]), w.shape)
    return out


@torch.no_grad()
def exact_norms(matrices: dict[str, torch.Tensor], n_heads: int | None = None) -> dict[str, float]:
    """RMS→RMS norms by float64 SVD: the oracle. With `n_heads`, W_q/W_k/W_v's head blocks too."""
    units = norm_units(matrices, n_heads)
    return _table(units, {k: torch.linalg.matrix_norm(w.detach().double(), ord=2) for k, w in units.items()})


@torch.no_grad()
def embed_rms_max(embed: torch.Tensor) -> float:
    """Largest token-vector RMS of a (vocab, d) embedding: its ℓ1→RMS norm."""
    return embed.detach().double().pow(2).mean(dim=1).sqrt().max().item()


class SigmaEstimator:
    """Per-step σ₁ estimates by power iteration, one persistent vector per matrix and per head
    block (keys as `norm_keys`).

    Vectors are seeded from (seed, key) with a private generator, so all replicas agree.
    Power iteration approaches σ₁ from below: this is an estimate; `exact_norms` is the check.
    """

    def __init__(self, iters: int = 2, seed: int = 0, n_heads: int | None = None):
        self.iters, self.seed, self.n_heads = iters, seed, n_heads
        self.vectors: dict[str, torch.Tensor] = {}

    def _init(self, key: str, n: int, device) -> torch.Tensor:
        return start_vector(self.seed, key, n).to(device)

    @torch.no_grad()
    def __call__(self, matrices: dict[str, torch.Tensor]) -> dict[str, float]:
        units = norm_units(matrices, self.n_heads)
        sigmas = {}
        for key, w in units.items():
            keys = ([block_key(key[:-3], h) for h in range(w.shape[0])] if key.endswith("[*]") else [key])
            fresh = any(k not in self.vectors for k in keys)
            v = torch.stack([self.vectors[k] if k in self.vectors else self._init(k, w.shape[-1], w.device)
                             for k in keys])
            sigma, _, v = power_iteration(w.detach().float().reshape(len(keys), *w.shape[-2:]), v,
                                          self.iters * (10 if fresh else 1))
            self.vectors.update(zip(keys, v.unbind(0)))
            sigmas[key] = sigma
        return _table(units, sigmas)

    def state_dict(self) -> dict:
        return {"vectors": {n: v.cpu() for n, v in self.vectors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.vectors = {n: v.clone() for n, v in state["vectors"].items()}


@dataclass
class Certificate:
    """Whole-network bound. `bound` maps token ids → logits (includes the embedding);
    `network_bound` maps embeddings with per-token RMS ≤ `r0` (= max(1, largest token RMS of the
    embedding)) → logits."""

    bound: float
    log10_bound: float
    network_bound: float
    embed: float
    head: float
    r0: float = 1.0
    blocks: list = field(default_factory=list)  # per layer: attn, mlp, r_in, heads (per-head L_h)
    norms: dict = field(default_factory=dict)
    max_cap_ratio: float = 0.0  # max over capped units of ‖W‖/cap (≤ 1 + CAP_RTOL when certified)

    def violations(self, caps: dict[str, float | None]) -> list[str]:
        """Capped units (matrix names or head-block keys) whose norm exceeds the cap."""
        return [n for n, c in caps.items() if c is not None and self.norms.get(n, 0.0) > c * (1 + CAP_RTOL)]


def head_norms(norms: dict[str, float], name: str, H: int) -> list[float]:
    """Per-head RMS→RMS norms of `name`'s row blocks; √H·‖W‖ for each when the table lacks them
    (a (d/H, d) row block of a (d, d) matrix has σ₁ ≤ σ₁(W), so its norm is ≤ √H·‖W‖)."""
    keys = [block_key(name, h) for h in range(H)]
    if H > 1 and all(k in norms for k in keys):
        return [norms[k] for k in keys]
    return [math.sqrt(H) * norms[name]] * H


def certify(norms: dict[str, float], embed: float, cfg: ModelConfig,
            caps: dict[str, float | None] | None = None) -> Certificate:
    """Compose the bound from RMS→RMS norms (names as in the model, head blocks as `block_key`)
    and the embedding's largest token RMS. The activation-magnitude bound r starts at
    r0 = max(1, embed): the domain is embeddings with per-token RMS ≤ r0.

    Per attention layer, with a_h, b_h, c_h the norms of head h's blocks of W_q, W_k, W_v:
    L_att = (1/3)‖W_o‖·√(mean_h [c_h(1 + 2 s r² a_h b_h)]²), and the output's token RMS is at
    most (1/3)‖W_o‖·√(mean_h c_h²)·r."""
    alpha, s, H = 1.0 / (2 * cfg.n_layers), cfg.attn_scale, cfg.n_heads
    r0 = max(1.0, embed)
    r, log_net, blocks = r0, 0.0, []
    for i in range(cfg.n_layers):
        name = lambda key, i=i: f"blocks.{i}.{key}.weight"  # noqa: E731
        a, b, c = (head_norms(norms, name(k), H) for k in ("attn.q", "attn.k", "attn.v"))
        wo, w_in, w_out = norms[name("attn.o")], norms[name("mlp.fc_in")], norms[name("mlp.fc_out")]
        per_head = [ch * (1 + 2 * s * r * r * ah * bh) for ah, bh, ch in zip(a, b, c)]
        l_att = ATTN_OUT_SCALE * wo * math.sqrt(sum(x * x for x in per_head) / H)
        r_in = r
        r = (1 - alpha) * r + alpha * ATTN_OUT_SCALE * wo * math.sqrt(sum(x * x for x in c) / H) * r
        l_mlp = w_out * w_in  # GELU/GELU_MAX_SLOPE is 1-Lipschitz
        r = (1 - alpha) * r + alpha * (w_out * w_in / GELU_MAX_SLOPE) * r
        log_net += math.log10((1 - alpha) + alpha * l_att) + math.log10((1 - alpha) + alpha * l_mlp)
        blocks.append({"attn": l_att, "mlp": l_mlp, "r_in": r_in,
                       "heads": [ATTN_OUT_SCALE * wo * x for x in per_head]})
    # Logits are the first vocab_size of the head's padded rows: their RMS over vocab_size entries
    # is at most √(rows/vocab_size) times the RMS over all rows.
    pad = math.sqrt(padded_vocab(cfg) / cfg.vocab_size) if cfg.vocab_size > 0 else 1.0
    head = norms["head.weight"] * pad * abs(cfg.logit_scale)
    log_head = math.log10(head) if head > 0 else -math.inf
    log_embed = math.log10(embed) if embed > 0 else -math.inf
    log_net_total = log_net + log_head
    log_bound = log_embed + log_net_total
    ratios = [norms[k] / c for k, c in (caps or {}).items() if c and k in norms]
    return Certificate(
        bound=_pow10(log_bound), log10_bound=log_bound, network_bound=_pow10(log_net_total),
        embed=embed, head=head, r0=r0, blocks=blocks, norms=dict(norms), max_cap_ratio=max(ratios, default=0.0))


def certify_weights(weights: dict[str, torch.Tensor], cfg: Config) -> tuple[Certificate, dict[str, float | None]]:
    """The exact certificate of a full set of weights (names as in the model, the embedding
    included): float64 SVD of every matrix and head block, checked against the run's caps.
    Returns (certificate, caps by capped unit as `caps.unit_caps`)."""
    names = [n for n in weights if n != "embed.weight"]
    caps = unit_caps(cfg, names)
    norms = exact_norms({n: weights[n] for n in names}, cfg.model.n_heads)
    return certify(norms, embed_rms_max(weights["embed.weight"]), cfg.model, caps), caps


def weighted_bound(weights: list[float], bounds: list[float]) -> float:
    """Certificate of Σ_i w_i·f_i for maps f_i on one input certified at `bounds` B_i:
    ‖Σ w_i (f_i(x) − f_i(y))‖ ≤ Σ |w_i|·‖f_i(x) − f_i(y)‖ ≤ (Σ |w_i|·B_i)·d(x, y) (triangle
    inequality in the output norm). An ensemble of models on the same token ids."""
    if len(weights) != len(bounds):
        raise ValueError(f"weighted_bound: {len(weights)} weights for {len(bounds)} bounds")
    return sum(abs(w) * b for w, b in zip(weights, bounds))


def _pow10(x: float) -> float:
    return 0.0 if x == -math.inf else (math.inf if x > 308 else 10.0 ** x)

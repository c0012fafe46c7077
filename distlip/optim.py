"""Optimisers: Muon for matrices, a per-token normalised step or Adam for the embedding,
AdamW as the baseline, and the learning-rate / momentum schedules (docs/method.md#muon).

The per-matrix update math lives in pure functions (`muon_update`, `colnorm_update`) so the
sharded engine can run exactly the same arithmetic on the matrices a rank owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distlip.config.schema import OptimConfig
from distlip.lipschitz.newton_schulz import NS_MAX_GAIN, orthogonalize
from distlip.model import block_key, matrix_of, param_group


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate at `step` (0-based): linear warm-up, constant until `decay_start`·total,
    then linear to `final_lr_frac`·lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = step / max(total - 1, 1)
    if frac <= cfg.decay_start:
        return cfg.lr
    t = (frac - cfg.decay_start) / max(1.0 - cfg.decay_start, 1e-12)
    return cfg.lr * (1.0 - t * (1.0 - cfg.final_lr_frac))


def momentum_at(cfg: OptimConfig, step: int) -> float:
    """Muon momentum, warmed linearly from momentum_start to momentum over momentum_warmup steps."""
    if cfg.momentum_warmup <= 0 or step >= cfg.momentum_warmup:
        return cfg.momentum
    return cfg.momentum_start + (cfg.momentum - cfg.momentum_start) * step / cfg.momentum_warmup


def depth_scale(name: str, n_layers: int, decay: float) -> float:
    """Learning-rate factor of a parameter for the per-block decay: block i of `n_layers`
    steps at `decay`^(n_layers−1−i) times its group's rate, so with decay 0.5 each residual
    block toward the input moves half as fast as the one above it (the paper's authors halve
    the step size per layer this way; the first blocks then barely move and stay far below
    their caps, which keeps the certified bound small). The embedding and the head keep 1."""
    if decay == 1.0 or not name.startswith("blocks."):
        return 1.0
    return decay ** (n_layers - 1 - int(name.split(".")[1]))


@torch.no_grad()
def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lrs: list[float],
                beta: float, nesterov: bool, ortho=orthogonalize) -> list[float]:
    """One Muon step, in place, on same-shape (d_out, d_in) matrices batched through one
    Newton–Schulz call: momentum, orthogonalisation, update scaled by √(d_out/d_in).

    `bufs` are fp32 momentum buffers; `ortho` is `orthogonalize` or its compiled form. Returns,
    per matrix, the RMS→RMS norm bound of the update actually applied, lr·NS_MAX_GAIN, which the
    soft cap's coupling needs.
    """
    for buf, g in zip(bufs, grads):
        buf.lerp_(g, 1 - beta)
    dirs = [g.lerp(buf, beta) if nesterov else buf for g, buf in zip(grads, bufs)]
    d_out, d_in = params[0].shape
    for p, o, lr in zip(params, ortho(torch.stack(dirs)), lrs):
        p.add_(o.to(p.dtype), alpha=-lr * math.sqrt(d_out / d_in))
    return [lr * NS_MAX_GAIN for lr in lrs]


def group_by_shape(names: list[str], shape_of) -> list[list[str]]:
    """Names grouped by matrix shape, in first-seen order (one batched call per group)."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(tuple(shape_of(n)), []).append(n)
    return list(groups.values())


@torch.no_grad()
def colnorm_update(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, beta: float,
                   growth_cap: float) -> None:
    """Embedding step (vocab, d): EMA momentum, then each token vector's step normalised to
    RMS 1; a token whose gradient is tiny is boosted at most `growth_cap`× relative to the
    largest one (so rare tokens do not take unit steps on noise)."""
    buf.lerp_(grad, 1 - beta)
    rms = buf.pow(2).mean(dim=1, keepdim=True).sqrt()
    floor = rms.max().clamp_min(1e-30) / growth_cap
    p.sub_(buf / torch.maximum(rms, floor), alpha=lr)


@torch.no_grad()
def nesterov_outer_update(x: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, *, lr: float, momentum: float) -> None:
    """The outer step of the local-step loop, in place (torch SGD's Nesterov form, as DiLoCo's):
    b ← μ·b + g, then x ← x − lr·(g + μ·b). `g` is the mean pseudo-gradient (round-start weights
    minus local weights), `buf` the fp32 momentum b (zeros before the first round), all shaped
    like x. lr 1 and μ 0 set x to the mean of the local weights."""
    buf.mul_(momentum).add_(g)
    x.sub_(g.add(buf, alpha=momentum), alpha=lr)


@dataclass
class StepInfo:
    """What the optimiser did this step, for the constraint and the log."""

    lr: float
    momentum: float
    update_norms: dict  # matrix name → RMS→RMS bound on its update (None when unknown: AdamW)


class Optimizers:
    """All parameter updates of one model. `step(step_idx, total)` applies them and returns StepInfo.

    `names` restricts the matrices this instance updates (the sharded engine passes the set a
    rank owns); the embedding is updated when "embed.weight" is among them.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], cfg: OptimConfig, n_layers: int = 0,
                 row_blocks: dict[str, int] | None = None):
        """row_blocks: name → H for matrices Muon orthogonalises as H row blocks (heads), each
        (d_out/H, d_in) block its own matrix, so each block's RMS→RMS step is ≤ lr·NS_MAX_GAIN."""
        self.cfg = cfg
        self.row_blocks = {n: h for n, h in (row_blocks or {}).items() if h > 1 and n in named_params}
        # per-parameter multiplier: the group's lr_mult times the per-block depth decay
        self.mult = {n: cfg.lr_mult.get(param_group(n), 1.0) * depth_scale(n, n_layers, cfg.depth_lr_decay)
                     for n in named_params}
        self.params = named_params
        self.matrices = {n: p for n, p in named_params.items() if n != "embed.weight"}
        self.embed = named_params.get("embed.weight")
        self.state: dict[str, torch.Tensor] = {}
        self.orthogonalized = 0  # matrices put through Newton–Schulz (the sharding tests count it)
        self.orthogonalize = orthogonalize
        self.adam: torch.optim.Optimizer | None = None
        if cfg.name == "adamw":
            self.adam = torch.optim.AdamW(
                [{"params": [p], "name": n, "mult": self.mult[n]} for n, p in named_params.items()],
                lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        elif self.embed is not None and cfg.embed == "adam":
            self.adam = torch.optim.Adam([{"params": [self.embed], "name": "embed.weight",
                                           "mult": cfg.lr_mult.get("embed", 1.0)}],
                                         lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    def compile(self) -> None:
        """Newton–Schulz through `torch.compile` (train.compile): the same polynomial, its steps fused."""
        self.orthogonalize = torch.compile(orthogonalize)

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.state:
            self.state[name] = torch.zeros_like(like, dtype=torch.float32)
        return self.state[name]

    @torch.no_grad()
    def step(self, step: int, total: int, grads: dict[str, torch.Tensor] | None = None) -> StepInfo:
        """Apply one update. `grads` overrides `p.grad` (the sharded engine passes reduced ones)."""
        cfg = self.cfg
        lr, beta = lr_at(cfg, step, total), momentum_at(cfg, step)
        grad = (lambda n, p: grads[n]) if grads is not None else (lambda n, p: p.grad)
        norms: dict[str, float | None] = {}
        if self.adam is not None:
            for group in self.adam.param_groups:
                group["lr"] = lr * group["mult"]
                if grads is not None:
                    group["params"][0].grad = grads[group["name"]]
            self.adam.step()
        if cfg.name == "adamw":
            return StepInfo(lr, beta, {n: None for n in self.matrices})
        units = self._units(grad)
        for keys in group_by_shape(list(units), lambda k: units[k][0].shape):
            ps, gs, bufs, mults = zip(*(units[k] for k in keys))
            applied = muon_update(list(ps), list(gs), list(bufs), [lr * m for m in mults], beta, cfg.nesterov,
                                  self.orthogonalize)
            for k, mu in zip(keys, applied):
                norms[matrix_of(k)] = max(mu, norms.get(matrix_of(k)) or 0.0)
        self.orthogonalized += len({matrix_of(k) for k in units})  # a matrix's head blocks count once
        if self.embed is not None and cfg.embed == "colnorm":
            colnorm_update(self.embed, grad("embed.weight", self.embed).float(),
                           self._buffer("embed.weight", self.embed), lr * cfg.lr_mult.get("embed", 1.0), beta,
                           cfg.embed_growth_cap)
        return StepInfo(lr, beta, norms)

    def _units(self, grad) -> dict[str, tuple]:
        """What Newton–Schulz orthogonalises, by key: (weight, fp32 gradient, momentum, lr mult),
        a whole matrix or, for matrices in row_blocks, each row block as views into the matrix,
        its gradient and its momentum (so the updates land in place)."""
        units = {}
        for n, p in self.matrices.items():
            g, buf, H = grad(n, p).float(), self._buffer(n, p), self.row_blocks.get(n, 1)
            if H == 1:
                units[n] = (p, g, buf, self.mult[n])
                continue
            for h, (pb, gb, bb) in enumerate(zip(p.chunk(H), g.chunk(H), buf.chunk(H))):
                units[block_key(n, h)] = (pb, gb, bb, self.mult[n])
        return units

    def state_dict(self) -> dict:
        """Momenta keyed by parameter name, so a resume at another world size can re-shard them."""
        out = {"momentum": {n: t.clone() for n, t in self.state.items()}}
        if self.adam is not None:
            out["adam"] = {g["name"]: self.adam.state.get(g["params"][0], {}) for g in self.adam.param_groups}
        return out

    def load_state_dict(self, state: dict) -> None:
        for name, t in state.get("momentum", {}).items():
            if name in self.params:
                self.state[name] = t.clone().to(self.params[name].device)
        if self.adam is not None:
            for group in self.adam.param_groups:
                saved = state.get("adam", {}).get(group["name"])
                if saved:
                    p = group["params"][0]
                    self.adam.state[p] = {k: (v.clone().to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                          for k, v in saved.items()}

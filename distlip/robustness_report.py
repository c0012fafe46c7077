"""What a trained model's certificate buys, measured on its validation windows.

`evaluate` gives clean accuracy, certified accuracy at each ε (from `lipschitz.robustness`),
the median certified radius of correct predictions, and empirical robust accuracy under the
attack of `lipschitz.adversarial`. `probe` measures the certificate's looseness: the largest
output/input distance ratio that gradient ascent on input pairs and a Jacobian power
iteration find near real inputs, beside the certified bound. `format_table` and `plot` show
the results. The model is evaluated on CPU in float32 (the probe in float64), a few windows at
a time, so memory stays at batch × context × vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distlip.errors import DataError
from distlip.lipschitz.adversarial import attack
from distlip.lipschitz.caps import has_caps
from distlip.lipschitz.certificate import CAP_RTOL, certify_weights
from distlip.lipschitz.robustness import (
    bounds_at,
    certified_at,
    certified_radius,
    head_margin,
    norm_margin,
    summarize,
)
from distlip.metrics import Progress
from distlip.model import LipschitzTransformer


@dataclass
class Robustness:
    """One model's results. Accuracies are fractions of `predictions`, one per ε in `eps`;
    `certified` and `median_radius` are None for a model with no certificate. Radii are in
    per-token RMS of the input embeddings (token vectors have RMS ≤ 1)."""

    name: str
    eps: list[float]
    predictions: int
    clean: float
    empirical: list[float]
    bound: float | None = None  # certified bound of embeddings → logits
    certified: list[float] | None = None
    median_radius: float | None = None
    median_radius_norm: float | None = None  # the same from the logits' norm alone (√(2V) factor)
    probe: dict = field(default_factory=dict)


def validation_ids(cfg, tokenizer) -> np.ndarray:
    """The run's validation split as token ids (the text it was trained on, re-read and checked
    against the model's character vocabulary, or the stream's held-out tokens)."""
    from distlip.data.in_memory import load_char_corpus

    d = cfg.data
    if d.in_memory:
        tok, _, ids = load_char_corpus(d.source, d.path, d.val_fraction)
        if tok.to_dict() != tokenizer.to_dict():
            raise DataError(f"the validation text ({d.source} {d.path}) no longer gives the model's character "
                            "vocabulary: point data.path at the text the model was trained on")
        return ids
    from distlip.data.stream import hold_out

    if d.val_tokens <= 0:
        raise DataError(f"data.source={d.source} streams its data and the run held out no validation tokens "
                        "(data.val_tokens=0): nothing to evaluate")
    return hold_out(d, tokenizer).tokens


def validation_windows(cfg, tokenizer, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`windows` evenly spaced non-overlapping validation windows (0: all) of the run's data,
    as (n, T) inputs and targets, T = the run's sequence length."""
    from distlip.data.in_memory import val_windows

    return val_windows(validation_ids(cfg, tokenizer), cfg.seq_len(), windows)


def attention_mask(cfg, tokenizer, x: torch.Tensor) -> torch.Tensor | None:
    """The document-causal mask for windows `x` (B, T) when the run trained with one, else None."""
    if not cfg.data.document_mask:
        return None
    from distlip.data.packing import document_causal_mask

    return document_causal_mask(x, tokenizer.eot_id)


def model_bounds(model: LipschitzTransformer, cfg) -> tuple[float, object, object, float] | None:
    """(network bound, embeddings → logits bound at input RMS R, → final residual bound at R,
    largest embedding RMS), by exact SVD; None when the run caps no matrix (no certificate)."""
    cert, caps = certify_weights({n: p.detach() for n, p in model.named_parameters()}, cfg)
    if not has_caps(caps):
        return None
    net_at, body_at = bounds_at(cert.norms, model.cfg)
    return cert.network_bound, net_at, body_at, cert.embed


def evaluate(name: str, model: LipschitzTransformer, cfg, tokenizer, x: torch.Tensor,
             y: torch.Tensor, eps: list[float], *, batch: int = 8, steps: int = 10, restarts: int = 2,
             loss: str = "margin", progress: bool = True) -> Robustness:
    """Certified and empirical robustness of `model` on windows `x`, `y` (n, T) at each ε.
    `batch` windows are evaluated (and attacked) at a time."""
    model.eval().requires_grad_(False)
    bounds = model_bounds(model, cfg)
    margins, norm_margins, correct, alive = [], [], [], torch.zeros(len(eps))
    bar = Progress(len(range(0, len(x), batch)), enabled=progress)
    for i, start in enumerate(range(0, len(x), batch)):
        xb, yb = x[start:start + batch], y[start:start + batch]
        mask = attention_mask(cfg, tokenizer, xb)
        f = lambda h, mask=mask: model.logits_from_embeddings(h, mask)  # noqa: E731
        h = model.embed(xb)
        with torch.no_grad():
            z = f(h)
        correct.append((z.argmax(-1) == yb).flatten())
        margins.append(head_margin(z.flatten(0, 1), model.head.weight, model.cfg.logit_scale))
        norm_margins.append(norm_margin(z.flatten(0, 1)))
        for j, e in enumerate(eps):
            alive[j] += attack(f, h, yb, e, steps=steps, restarts=restarts, loss=loss, seed=i).sum()
        bar.update(i + 1, {"windows": min(start + batch, len(x))})
    bar.close()
    correct, margin = torch.cat(correct), torch.cat(margins)
    n = correct.numel()
    out = Robustness(name, list(eps), n, correct.sum().item() / n, (alive / n).tolist())
    if bounds is not None:
        bound, net_at, body_at, embed = bounds
        certified = [certified_at(margin, body_at, embed, e) for e in eps]
        s = summarize(correct, certified, certified_radius(margin, body_at, embed))
        out.bound, out.certified, out.median_radius = bound, s["certified_accuracy"], s["median_radius"]
        out.median_radius_norm = summarize(correct, [], certified_radius(torch.cat(norm_margins), net_at, embed))[
            "median_radius"]
    return out


class ProbeError(Exception):
    """The probe found a ratio above the certified bound: the certificate is wrong (a bug)."""


def probe(name: str, model: LipschitzTransformer, cfg, tokenizer, x: torch.Tensor,
          radii: tuple[float, ...] = (0.01, 0.1, 0.5), *, steps: int = 30, restarts: int = 2,
          iters: int = 20) -> dict:
    """Largest ratio max_rms(f(a) − f(b)) / max_rms(a − b) found for f = embeddings → logits
    near the embeddings of windows `x` (n, T), in float64: gradient ascent on pairs within each
    radius of `radii`, and Jacobian power iteration at the inputs.

    Returns {"found", "bound", "looseness" (bound / found), "rows": [(method, radius, found,
    bound on that ball)]}. Each ratio is compared with the bound on the ball it came from
    (inputs of RMS up to the largest embedding RMS + radius); one above it raises ProbeError.
    """
    from distlip.lipschitz.attack import jacobian_attack, pair_attack

    bounds = model_bounds(model, cfg)
    m = copy.deepcopy(model).double().eval().requires_grad_(False)
    best: dict = {}  # (method, radius) → (largest ratio over windows, bound on that ball)
    for i in range(len(x)):
        xb = x[i:i + 1]
        mask = attention_mask(cfg, tokenizer, xb)
        f = lambda h, mask=mask: m.logits_from_embeddings(h, mask)  # noqa: E731
        h = m.embed(xb)
        trials = [("jacobian", 0.0, jacobian_attack(f, h, iters=iters, seed=i))]
        trials += [("pairs", r, pair_attack(f, h, r, steps=steps, restarts=restarts, seed=i)) for r in radii]
        for method, r, ratio in trials:
            limit = bounds[1](bounds[3] + r) if bounds else None
            if limit is not None and ratio > limit * (1 + CAP_RTOL):
                raise ProbeError(f"{name}: {method} at radius {r:g} found the ratio {ratio:.6g} above the certified "
                                 f"bound {limit:.6g} on that ball: the certificate is wrong for this model (a bug)")
            key = (method, r)
            best[key] = (max(best.get(key, (0.0,))[0], ratio), limit)
    bound = bounds[0] if bounds else None
    found = max(v[0] for v in best.values())
    return {"found": found, "bound": bound, "looseness": bound / found if bound and found > 0 else None,
            "rows": [(method, r, v[0], v[1]) for (method, r), v in best.items()]}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def format_table(results: list[Robustness]) -> str:
    """A block of facts per model, then one row per ε with certified and empirical robust
    accuracy per model ("-": not certified)."""
    lines = []
    for r in results:
        bound = "not certified (no matrix is capped)" if r.bound is None else f"{r.bound:.4g}"
        radius = ("-" if r.median_radius is None
                  else f"{r.median_radius:.4g} (from the logits' norm alone {r.median_radius_norm:.4g})")
        lines.append(f"{r.name}: {r.predictions} predictions, clean accuracy {r.clean:.1%}, "
                     f"bound (embeddings → logits) {bound}, median certified radius of correct predictions {radius}")
        if r.probe:
            p = r.probe
            loose = "-" if p["looseness"] is None else f"{p['looseness']:.3g}"
            lines.append(f"  largest ratio found {p['found']:.4g}; bound / found (looseness) {loose}")
    width = max(len(r.name) for r in results) + 2
    lines.append("")
    lines.append(f"{'ε':>8}" + "".join(f"{r.name + ' cert':>{width + 5}}{'emp':>8}" for r in results))
    for i, e in enumerate(results[0].eps):
        lines.append(f"{e:>8.3g}" + "".join(
            f"{_pct(r.certified[i] if r.certified else None):>{width + 5}}{_pct(r.empirical[i]):>8}" for r in results))
    return "\n".join(lines)


def plot(results: list[Robustness], path: str | Path) -> Path:
    """PNG of certified (solid) and empirical robust (dashed) accuracy against ε (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax.plot(r.eps, r.empirical, "--o", color=color, ms=4, label=f"{r.name}: empirical (attack)")
        if r.certified is not None:
            ax.plot(r.eps, r.certified, "-s", color=color, ms=4, label=f"{r.name}: certified")
        ax.axhline(r.clean, color=color, lw=0.6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("ε: per-token RMS of the embedding perturbation (token vectors have RMS ≤ 1)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, max(max(r.clean for r in results) * 1.1, 0.05))
    ax.grid(alpha=0.3)
    if len(results) > 3:  # the legend would hide the curves: beside the axes instead
        fig.set_size_inches(10.5, 4.2)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

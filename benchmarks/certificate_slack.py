"""Where a tighter certificate could come from, measured on trained weights.

The certificate (docs/certificate.md) bounds each factor by products of operator norms. Three
sharper per-layer quantities are sound and cheap, and each would shrink the bound if trained
weights left room between it and the product it replaces:

- MLP: σ₁(W_out·W_in) against σ₁(W_out)·σ₁(W_in). GELU'/1.1289 lies in [−0.114, 1], so
  the MLP's Jacobian is W_out·(c·I + E)·W_in with c = 0.443 and ‖E‖ ≤ 0.557: a product norm
  below the product of norms would cut L_mlp and the magnitude gain.
- Attention logits: max over rotary offsets Δ of σ₁(W_q^hᵀ·R_Δ·W_k^h) against σ₁(W_q^h)·σ₁(W_k^h):
  the logit is a bilinear form in the two tokens, and its norm is what the qk term needs.
- First layer: the inputs are token embeddings, and a Lipschitz bound for token ids only needs the
  convex hull of the vocabulary's rows (segments between token sequences stay in it), so the largest
  rms(W^h·e_v) over the vocabulary could replace ‖W^h‖·r for q, k and v.

Each ratio is 1 when the trained weights leave no room. The script also evaluates the whole-matrix
formula (the single-head expression with whole-matrix norms, the form the Lipschitz-transformer
paper's bound takes; unsound for several heads, docs/certificate.md) and attacks the model
(Jacobian power iteration at validation inputs, pairs anywhere in the unit ball: the certificate's
domain), so that a formula an attack beats is shown beaten.

    python benchmarks/certificate_slack.py RUN [RUN ...] [--windows 4] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from common import ROOT, provenance, table, write_section

sys.path.insert(0, str(ROOT))

from distlip.checkpoint.export import load_model  # noqa: E402
from distlip.lipschitz.attack import jacobian_attack, pair_attack  # noqa: E402
from distlip.lipschitz.certificate import certify, embed_rms_max, exact_norms, rms_operator_norm  # noqa: E402
from distlip.robustness_report import validation_windows  # noqa: E402


def sigma(a: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a (..., m, n) batch, float64."""
    return torch.linalg.matrix_norm(a.double(), 2)


def mlp_ratio(w_in: torch.Tensor, w_out: torch.Tensor) -> float:
    """σ₁(W_out·W_in) / (σ₁(W_out)·σ₁(W_in)); W_in (h, d), W_out (d, h)."""
    w_in, w_out = w_in.double(), w_out.double()
    return (sigma(w_out @ w_in) / (sigma(w_out) * sigma(w_in))).item()


def rotations(d_head: int, fraction: float, base: float, offsets: torch.Tensor) -> torch.Tensor:
    """Rotary maps R_Δ (len(offsets), d_head, d_head) acting on a head's q or k as the model's
    rotary does at relative position Δ (the first `fraction` of the dimensions rotate in pairs
    (i, i + rot/2))."""
    rot = int(d_head * fraction)
    R = torch.eye(d_head, dtype=torch.float64).repeat(len(offsets), 1, 1)
    if rot == 0:
        return R
    freqs = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = offsets.double()[:, None] * freqs  # (n, rot/2)
    i = torch.arange(rot // 2)
    R[:, i, i], R[:, i, i + rot // 2] = ang.cos(), -ang.sin()
    R[:, i + rot // 2, i], R[:, i + rot // 2, i + rot // 2] = ang.sin(), ang.cos()
    return R


def qk_ratio(wq: torch.Tensor, wk: torch.Tensor, R: torch.Tensor) -> float:
    """max over the rotations R (n, d_head, d_head) of σ₁(W_qᵀ R W_k) / (σ₁(W_q)·σ₁(W_k)) for one
    head's (d_head, d) blocks: the logit q_t·k_j = x_tᵀ W_qᵀ R_{j−t} W_k x_j."""
    return (sigma(wq.double().T @ R @ wk.double()).max() / (sigma(wq) * sigma(wk))).item()


def vocab_ratio(w: torch.Tensor, embed: torch.Tensor) -> float:
    """Largest rms(W·e_v) over the vocabulary's rows e_v, over the most any input of RMS ≤ max rms(e_v)
    can reach (RMS→RMS norm × that radius); W (m, d), embed (V, d)."""
    reach = rms_operator_norm(sigma(w).item(), w.shape) * embed_rms_max(embed)
    return embed_rms_max(embed.double() @ w.double().T) / reach


def slack(run: str, windows: int) -> dict:
    """The three ratios (smallest and largest over layers and heads), the two formulas and the attack."""
    model, cfg, tok, _ = load_model(run)
    m, w = cfg.model, {n: p.detach() for n, p in model.state_dict().items()}
    H, dh = m.n_heads, m.d_model // m.n_heads
    heads = lambda x: [x[h * dh:(h + 1) * dh] for h in range(H)]  # noqa: E731
    R = rotations(dh, m.rotary_fraction, m.rotary_base, -torch.arange(m.context))  # causal: j − t ≤ 0
    mlp, qk = [], []
    for i in range(m.n_layers):
        b = f"blocks.{i}."
        mlp.append(mlp_ratio(w[b + "mlp.fc_in.weight"], w[b + "mlp.fc_out.weight"]))
        qk += [qk_ratio(q, k, R) for q, k in zip(heads(w[b + "attn.q.weight"]), heads(w[b + "attn.k.weight"]))]
    vocab = [vocab_ratio(x, w["embed.weight"])
             for key in ("q", "k", "v") for x in heads(w[f"blocks.0.attn.{key}.weight"])]

    names = [n for n, x in w.items() if x.dim() == 2 and n != "embed.weight"]
    embed = embed_rms_max(w["embed.weight"])
    norms = exact_norms({n: w[n] for n in names}, H)  # every matrix's norm, and every head block's
    per_head = certify(norms, embed, m)
    whole = certify({n: norms[n] for n in names}, embed, dataclasses.replace(m, n_heads=1))

    f64 = model.double().eval().requires_grad_(False)
    f = lambda h: f64.logits_from_embeddings(h, None)  # noqa: E731
    x, _ = validation_windows(cfg, tok, windows)
    found = 0.0
    for i in range(len(x)):  # every input below has token RMS ≤ 1: the certificate's domain (r0 = 1)
        h = f64.embed(x[i:i + 1])
        found = max(found, jacobian_attack(f, h, iters=30, seed=i),
                    pair_attack(f, torch.zeros_like(h), 1.0, steps=60, restarts=4, seed=i))
    return {"run": Path(run).name, "layers": m.n_layers, "heads": H, "val_acc": _final(run).get("val_acc"),
            "mlp": f"{min(mlp):.3f}–{max(mlp):.3f}", "qk": f"{min(qk):.3f}–{max(qk):.3f}",
            "vocab": f"{min(vocab):.3f}–{max(vocab):.3f}", "certificate": per_head.network_bound,
            "whole_matrix": whole.network_bound, "found": found,
            "verdict": ("certificate BEATEN (a bug)" if found > per_head.network_bound * (1 + 1e-6) else
                        "whole-matrix formula beaten" if found > whole.network_bound else "both hold")}


def _final(run: str) -> dict:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return next((r for r in reversed(records) if r.get("event") == "final"), {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or exported models")
    ap.add_argument("--windows", type=int, default=4, help="validation windows attacked per run (default 4)")
    ap.add_argument("--results", default="", help="write (replace) this section in this markdown file")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [slack(r, args.windows) for r in args.runs]
    text = table(rows, [("run", "{}"), ("layers", "{}"), ("heads", "{}"), ("val_acc", "{:.2%}"), ("mlp", "{}"),
                        ("qk", "{}"), ("vocab", "{}"), ("certificate", "{:.4g}"), ("whole_matrix", "{:.4g}"),
                        ("found", "{:.4g}"), ("verdict", "{}")])
    print(text)
    if args.results:
        heading = "## Where a tighter certificate could come from (trained weights)"
        note = (f"{provenance()}. Command: `python benchmarks/certificate_slack.py {' '.join(sys.argv[1:])}`. "
                "Columns `mlp`, `qk`, `vocab`: smallest–largest over layers and heads of σ₁(W_out W_in)/(σ₁σ₁), "
                "max over rotary offsets of σ₁(W_qᵀ R W_k)/(σ₁σ₁), and the vocabulary's largest rms(W e_v) over "
                "the operator bound (first layer, q/k/v); 1 means no room for a sharper formula. `certificate`: "
                "distlip's (per head) and `whole_matrix`: the whole-matrix formula, both for embeddings → logits; "
                "`found`: the largest ratio the attacks found.")
        write_section(Path(args.results), heading, f"{heading}\n\n{note}\n\n{text}\n")


if __name__ == "__main__":
    main()

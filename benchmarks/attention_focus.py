"""How sharply trained models attend, against the ceiling their caps put on attention scores.

With the 1/d_head logit scale, a score is s·q·k/d_head = s·rms(q)·rms(k)·cos, so head h's scores
lie within ±s·r²·‖W_q^h‖·‖W_k^h‖ (r: the largest token RMS reaching the layer, as the
certificate bounds it). When that ceiling is a few units, softmax over hundreds of keys cannot
put its weight on one token, and the model falls back on what the current token alone predicts.
This script measures, on validation windows of each run: the largest |score| met, the ceiling,
the mean largest attention weight of a query (over the second half of each window, where at
least T/2 keys are visible) and the mean number of keys a query effectively reads (exp of the
attention entropy), against uniform attention over the same keys.

    python benchmarks/attention_focus.py RUN [RUN ...] [--windows 8] [--results benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import ROOT, provenance, table, write_section

sys.path.insert(0, str(ROOT))
from distlip.checkpoint.export import load_model  # noqa: E402
from distlip.lipschitz.certificate import certify_weights, head_norms  # noqa: E402
from distlip.robustness_report import validation_windows  # noqa: E402


def layer_focus(attn, x: torch.Tensor) -> dict:
    """Scores and attention weights of one attention layer on its input x (n, T, d), float64: the
    content scores (what the certificate charges for) and the weights they make with the layer's
    positional bias, if any."""
    T = x.shape[1]
    scores = attn.content_scores(x)  # (n, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(scores + attn.positional_bias(T, x.dtype), dim=-1)
    late = slice(T // 2, T)  # queries that see at least T/2 keys
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)[..., late]
    visible = torch.arange(1, T + 1, dtype=x.dtype)[late]
    return {"max_score": scores.masked_select(causal).abs().max().item(),
            "top_weight": p.max(-1).values[..., late].mean().item(),
            "uniform_weight": (1 / visible).mean().item(),
            "keys_read": entropy.exp().mean().item()}


@torch.no_grad()
def measure(run: Path, windows: int) -> list[dict]:
    model, cfg, tokenizer, _ = load_model(run)
    model = model.double().eval()
    cert, _ = certify_weights({k: v.double() for k, v in model.state_dict().items()}, cfg)
    x, y = validation_windows(cfg, tokenizer, windows)
    h = model.embed(x)
    acc = (model.logits_from_embeddings(h).argmax(-1) == y).double().mean().item()
    H, s = cfg.model.n_heads, cfg.model.attn_scale
    rows = []
    for i, block in enumerate(model.blocks):
        qk = [head_norms(cert.norms, f"blocks.{i}.attn.{m}.weight", H) for m in ("q", "k")]
        ceiling = s * cert.blocks[i]["r_in"] ** 2 * max(a * b for a, b in zip(*qk))
        rows.append({"run": run.name, "layer": i, "acc": 100 * acc, "ceiling": ceiling, "certificate": cert.bound,
                     **layer_focus(block.attn, h)})
        h = block(h)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (model.safetensors + config.json)")
    ap.add_argument("--windows", type=int, default=8, help="validation windows per run (default: %(default)s)")
    ap.add_argument("--results", type=Path, help="write the table to this RESULTS.md")
    args = ap.parse_args()
    rows = [r for run in args.runs for r in measure(run, args.windows)]
    out = table(rows, [("run", "{}"), ("layer", "{}"), ("acc", "{:.1f}"), ("certificate", "{:.3g}"),
                       ("ceiling", "{:.2f}"), ("max_score", "{:.2f}"), ("top_weight", "{:.3f}"),
                       ("uniform_weight", "{:.3f}"), ("keys_read", "{:.1f}")])
    print(out)
    if args.results:
        cmd = "python benchmarks/attention_focus.py " + " ".join(str(r) for r in args.runs)
        write_section(args.results, "## How sharply trained models attend",
                      f"## How sharply trained models attend\n\n{provenance()}. Command: `{cmd} --windows "
                      f"{args.windows}`. acc: top-1 on those windows; ceiling: s·r²·max_h ‖W_q^h‖‖W_k^h‖ "
                      "(exact norms, r from the certificate); top_weight and keys_read: the mean largest "
                      "attention weight and exp(entropy) of queries in the second half of each window; "
                      "uniform_weight: the same for uniform attention.\n\n" + out + "\n")


if __name__ == "__main__":
    main()

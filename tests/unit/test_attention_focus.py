"""`benchmarks/attention_focus.py`: a layer whose scores are all zero attends uniformly, one with large
scores on a single key reads that key, and the scores it reports are the model's own."""

import math
import sys

import torch

from distlip.config.schema import ModelConfig
from distlip.model import Attention

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from attention_focus import layer_focus  # noqa: E402


def attention(**kw) -> Attention:
    torch.manual_seed(0)
    return Attention(ModelConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, context=16, **kw)).double()


@torch.no_grad()
def test_zero_scores_attend_uniformly():
    attn = attention()
    attn.q.weight.zero_()
    f = layer_focus(attn, torch.randn(3, 16, 8, dtype=torch.float64))
    assert f["max_score"] == 0
    assert math.isclose(f["top_weight"], f["uniform_weight"], rel_tol=1e-12)
    assert math.isclose(f["keys_read"], sum(range(9, 17)) / 8, rel_tol=1e-9)  # queries 8…15 see 9…16 keys


@torch.no_grad()
def test_large_scores_on_one_key_read_one_key():
    attn = attention(rotary_fraction=0.0)
    attn.q.weight.copy_(torch.eye(8) * 60)
    attn.k.weight.copy_(torch.eye(8))
    x = torch.zeros(1, 16, 8, dtype=torch.float64)
    x[0, :, ::4] = 1.0  # every token points along the first coordinate of each head ...
    x[0, 3, ::4] = 4.0  # ... and key 3 4× more than any other
    f = layer_focus(attn, x)
    assert f["top_weight"] > 0.99 and f["keys_read"] < 1.1
    assert math.isclose(f["max_score"], 4.0 * 4.0 * 60 / attn.d_head, rel_tol=1e-12)  # q_3·k_3 / d_head


@torch.no_grad()
def test_positional_heads_are_measured_with_their_bias():
    attn = attention(lookback=[1, 2], lookback_bias=40.0)
    attn.q.weight.zero_()  # no content scores: only the positional bias decides where a head reads
    f = layer_focus(attn, torch.randn(2, 16, 8, dtype=torch.float64))
    assert f["max_score"] == 0
    assert f["top_weight"] > 0.99 and f["keys_read"] < 1.1

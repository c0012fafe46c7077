"""Bounded memory: the chunked head equals the unchunked one, and the memory model's terms
are what the code allocates."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from distlip.config import ModelConfig, load_config
from distlip.data.packing import document_causal_mask, document_ids
from distlip.errors import ConfigError
from distlip.evaluation import evaluate
from distlip.loss import chunk_tokens, head_cross_entropy, head_loss_and_correct
from distlip.memory import (
    GIB,
    activation_bytes_per_token_layer,
    block_mask_bytes,
    check_memory,
    estimate_memory,
    largest_fitting_micro_batch,
    param_shapes,
)
from distlip.model import LipschitzTransformer, document_block_mask
from distlip.trainer import Trainer

from helpers import ROOT


def tiny(**kw) -> LipschitzTransformer:
    torch.manual_seed(0)
    base = dict(vocab_size=61, pad_vocab_to=16, d_model=32, n_layers=2, n_heads=2, context=16, logit_scale=1.7)
    model = LipschitzTransformer(ModelConfig(**{**base, **kw}))
    with torch.no_grad():  # the head and output projections start at zero: give them values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_chunk_tokens_fits_the_budget():
    assert chunk_tokens(1.0, 50304) == 2**20 // (4 * 50304)
    assert chunk_tokens(1e-9, 50304) == 1
    assert chunk_tokens(256, 81) * 81 * 4 <= 256 * 2**20


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_unchunked(chunk):
    model = tiny()
    idx, y = torch.randint(0, 61, (3, 16)), torch.randint(0, 61, (3, 16))
    ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    m = model.cfg
    loss = head_cross_entropy(model.hidden(model.embed(idx)), model.head.weight, y, m.logit_scale, m.vocab_size, chunk)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert grads[-1][m.vocab_size:].abs().max() == 0  # padded head rows take no gradient


def test_chunked_loss_scales_with_the_upstream_gradient():
    model = tiny()
    idx, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    m = model.cfg
    h = model.hidden(model.embed(idx))
    (g1,) = torch.autograd.grad(head_cross_entropy(h, model.head.weight, y, m.logit_scale, m.vocab_size, 5),
                                model.head.weight, retain_graph=True)
    (g3,) = torch.autograd.grad(3 * head_cross_entropy(h, model.head.weight, y, m.logit_scale, m.vocab_size, 5),
                                model.head.weight)
    torch.testing.assert_close(g3, 3 * g1)


@pytest.mark.parametrize("chunk", [1, 13, 10_000])
def test_chunked_evaluation_equals_unchunked(chunk):
    model = tiny()
    idx, y = torch.randint(0, 61, (4, 16)), torch.randint(0, 61, (4, 16))
    with torch.no_grad():
        logits = model(idx)
        ref_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        ref_hits = (logits.argmax(-1) == y).sum()
        m = model.cfg
        loss, hits = head_loss_and_correct(model.hidden(model.embed(idx)), model.head.weight, y, m.logit_scale,
                                           m.vocab_size, chunk)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    assert hits.item() == ref_hits.item()


def test_evaluate_does_not_depend_on_the_chunk_or_the_window_batch(tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path)
    eng = trainer.engine
    vx, vy = trainer.data.val_x[:40], trainer.data.val_y[:40]
    with torch.no_grad():
        logits = eng.forward(vx)
    ref_loss = F.cross_entropy(logits.flatten(0, 1).double(), vy.flatten()).item()
    ref_acc = (logits.argmax(-1) == vy).sum().item() / vy.numel()
    for mib, batch in ((256.0, 0), (1e-4, 3), (0.01, 64)):
        eng.cfg = replace(trainer.cfg, train=replace(trainer.cfg.train, logits_chunk_mib=mib))
        loss, acc = evaluate(eng, vx, vy, trainer.autocast, batch=batch)
        assert abs(loss - ref_loss) <= 1e-6 * ref_loss and acc == ref_acc


def test_param_shapes_are_the_models():
    m = ModelConfig(vocab_size=61, pad_vocab_to=16, d_model=32, n_layers=3, n_heads=4, mlp_ratio=3, context=16)
    model = LipschitzTransformer(m)
    assert param_shapes(m) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def saved_bytes(model: LipschitzTransformer, idx: torch.Tensor, mask: bool, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves from the token ids to the last block (not
    parameters or buffers). The embedding's output is no leaf, as in training: autocast then
    casts it once per matrix that reads it."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    am = document_causal_mask(idx, 3) if mask else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.hidden(model.embed(idx), am)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kw", [dict(), dict(mlp_ratio=2, n_heads=4), dict(rotary_fraction=0.5, n_layers=3)])
def test_activation_term_is_what_autograd_saves(dtype, kw):
    model = tiny(**kw)
    B, T, m = 2, 16, model.cfg
    idx = torch.randint(4, 61, (B, T))
    per_layer = activation_bytes_per_token_layer(m, dtype)
    weight_copies = 2 * sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.")) \
        if dtype == "bfloat16" else 0
    rotary_copies = 2 * m.n_layers * 4 * T * int(m.d_model // m.n_heads * m.rotary_fraction) // 2 \
        if dtype == "bfloat16" else 0  # bf16 cos and sin tables, cast for q and for k in every layer
    got = saved_bytes(model, idx, mask=False, bf16=dtype == "bfloat16")
    assert got == m.n_layers * B * T * per_layer + weight_copies + rotary_copies + B * T * 8  # + the int64 ids
    masked = saved_bytes(model, idx, mask=True, bf16=dtype == "bfloat16")
    assert masked - got == m.n_layers * B * T * T * (2 if dtype == "bfloat16" else 4)


def preset_145m(*overrides):
    return load_config(ROOT / "configs/nanogpt-145m.yaml", ["data.source=text", "data.path=x.txt",
                                                             "data.tokenizer=tok.json", *overrides])


@pytest.mark.parametrize("B, T", [(3, 300), (2, 1024), (1, 128), (4, 40)])
def test_flex_mask_term_is_what_the_block_mask_holds(B, T):
    """Under train.attention=flex the mask term is the block mask's storage (every tensor it holds,
    and the document ids its mask reads), not the dense mask's."""
    g = torch.Generator().manual_seed(T)
    x = torch.randint(0, 9, (B, T), generator=g)
    ids = document_ids(x, 0)
    tiles = document_block_mask(ids)
    held = [t for t in tiles.as_tuple() if isinstance(t, torch.Tensor)]
    assert len(held) == 8  # partial and full tiles' counts and lists, and their transposes
    assert sum(t.untyped_storage().nbytes() for t in held) + ids.untyped_storage().nbytes() == block_mask_bytes(B, T)


def test_the_memory_model_counts_the_block_mask_under_flex():
    sdpa = preset_145m("data.document_mask=true")
    flex = preset_145m("data.document_mask=true", "train.attention=flex")
    plain = estimate_memory(preset_145m("data.document_mask=false"))
    a, b = estimate_memory(sdpa), estimate_memory(flex)
    B, T, L = a.micro_batch, sdpa.seq_len(), sdpa.model.n_layers
    additive = 2 if sdpa.train.dtype == "bfloat16" else 4
    dense = B * T * T * (1 + L * additive)  # the bool mask and each layer's additive copy
    assert a.activations - plain.activations == dense
    assert b.activations - plain.activations == block_mask_bytes(B, T) < dense / 1000
    assert a.eval_working - plain.eval_working == dense // L
    assert b.eval_working - plain.eval_working == block_mask_bytes(B, T)


def test_evaluation_memory_does_not_grow_with_windows_or_val_tokens():
    small = estimate_memory(preset_145m("train.eval_windows=8", "data.val_tokens=100000"))
    large = estimate_memory(preset_145m("train.eval_windows=100000", "data.val_tokens=100000000"))
    assert small == large
    # 145M, one 8 × 1024 micro-batch: every chunked-head buffer together stays below one float32 copy
    # of the micro-batch's logits (1.53 GiB; the unchunked loss held three)
    assert small.chunk_tokens == 1335 and small.logits < 8 * 1024 * 50257 * 4


def test_largest_fitting_micro_batch_is_the_boundary():
    cfg = preset_145m()
    limit = 20 * GIB
    fits = largest_fitting_micro_batch(cfg, 1, limit)
    assert fits >= 1
    assert estimate_memory(cfg, 1, micro_batch=fits).peak <= limit < estimate_memory(cfg, 1, micro_batch=fits + 1).peak


def test_a_micro_batch_that_cannot_fit_is_refused_naming_the_one_that_does():
    cfg = preset_145m("train.grad_accum=1", "train.max_memory_gib=40", "train.device=cpu")
    fits = largest_fitting_micro_batch(cfg, 1, 40 * GIB)
    with pytest.raises(ConfigError, match=f"largest micro-batch that fits is {fits} sequences"):
        check_memory(cfg, 1, torch.device("cpu"))
    ok = preset_145m("train.max_memory_gib=40", "train.device=cpu")  # 8 per micro-step
    assert check_memory(ok, 1, torch.device("cpu")).micro_batch == 8
    assert check_memory(preset_145m("train.grad_accum=1"), 1, torch.device("cpu")) is None  # no limit on CPU


def test_refusal_is_one_line_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distlip", "train", "--config", "configs/smoke.yaml",
                           "--out", str(tmp_path / "run"), "train.max_memory_gib=0.001"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: predicted peak memory") and "largest micro-batch that fits is" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_chunked_loss_under_bf16_autocast_matches_the_unchunked_bf16_head():
    model = tiny()
    idx, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    m = model.cfg
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        loss = head_cross_entropy(model.hidden(model.embed(idx)), model.head.weight, y, m.logit_scale, m.vocab_size, 5)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)  # same bf16 logits; chunked matmuls may round apart
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05 * r.abs().max().item())

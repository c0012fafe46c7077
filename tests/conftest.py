import os
import sys
from pathlib import Path

# Tests share two CPU cores; compilation would only add start-up time.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's JIT build cache of this environment, as the Makefile sets it (pytest run directly).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

"""Names the config accepts for its choice-valued keys, kept here so the checks can refuse a
misspelt name at load time without importing the packages that implement the choices."""

# constraint.method: the weight constraints `lipschitz.constraints` implements.
METHODS = (
    "none",
    "weight_decay",
    "spectral_weight_decay",
    "spectral_normalize",
    "stiefel",
    "spectral_hammer",
    "soft_cap",
    "hard_cap",
    "exact_cap",
)

# constraint.caps: the cap groups of `lipschitz.caps` (which matrices share a cap).
GROUPS = ("embed", "qk", "v", "o", "mlp_in", "mlp_out", "head")

# train.attention: the kernels `model.set_fast_path` can run masked attention through.
ATTENTION = ("sdpa", "flex")

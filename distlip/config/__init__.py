"""The run configuration: typed sections (`schema`), loading from YAML with dotted overrides
(`load`), and the checks run before any work starts (`checks`)."""

from distlip.config.checks import preflight, validate, validate_data
from distlip.config.load import apply_overrides, config_from_dict, load_config
from distlip.config.schema import (
    CompressionConfig,
    Config,
    ConstraintConfig,
    DataConfig,
    DistConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = ["CompressionConfig", "Config", "ConstraintConfig", "DataConfig", "DistConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "apply_overrides", "config_from_dict", "load_config", "preflight",
           "validate", "validate_data"]

"""The run configuration: typed sections, loading from YAML with dotted overrides, and checks."""

from distlip.config.schema import (
    CompressionConfig,
    Config,
    ConstraintConfig,
    DataConfig,
    DistConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    validate,
    validate_data,
)

__all__ = ["CompressionConfig", "Config", "ConstraintConfig", "DataConfig", "DistConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "apply_overrides", "config_from_dict", "load_config", "validate",
           "validate_data"]

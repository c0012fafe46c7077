"""The run configuration: typed sections (`schema`), the names its choice keys accept
(`choices`), loading from YAML with dotted overrides (`load`), and the checks that need nothing
but the config (`checks`). The ground floor: it imports nothing from distlip but `errors`."""

from distlip.config.checks import validate, validate_data
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
           "OptimConfig", "TrainConfig", "apply_overrides", "config_from_dict", "load_config", "validate",
           "validate_data"]

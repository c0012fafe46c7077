"""The `compression:` config block: typed overrides, and one clear error line for each mistake."""

import pytest

from distlip.config import Config, config_from_dict, load_config
from distlip.distributed.env import DistEnv
from distlip.errors import ConfigError
from distlip.preflight import check_config, check_distributed

from helpers import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def test_defaults_are_off_and_overrides_are_typed():
    assert not Config().compression.enabled
    cfg = load_config(SMOKE, ["compression.compressor=topk", "compression.ratio=0.01", "compression.ef21_eta=0.1",
                              "compression.ef21_eta_sent=0.01", "compression.downlink=topk",
                              "compression.downlink_ratio=0.05"])
    check_config(cfg)
    c = cfg.compression
    assert c.enabled and c.ratio == 0.01 and c.estimator is None and c.marina_p is None and c.ef21_eta_sent == 0.01
    assert config_from_dict(cfg.to_dict()).compression == c  # round trip through a run's config.json
    assert load_config(SMOKE, ["compression.estimator=dense"]).compression.enabled  # dense all-reduce, counted
    marina = load_config(SMOKE, ["compression.compressor=randk", "compression.ratio=0.1",
                                 "compression.estimator=marina", "compression.marina_p=0.2"])
    check_config(marina)
    assert marina.compression.marina_p == 0.2


@pytest.mark.parametrize("overrides, fragment", [
    (["compression.ratio=1.5", "compression.compressor=topk"], r"compression: compression ratio must be in \(0, 1\]"),
    (["compression.ratio=0", "compression.compressor=topk"], r"must be in \(0, 1\]"),
    (["compression.compressor=topk", "compression.ratio=0.01", "compression.estimator=diana"],
     "needs an unbiased compressor.*use compressor randk"),
    (["compression.compressor=topkk"], "did you mean 'topk'"),
    (["compression.compressor=randk", "compression.ratio=0.1", "compression.estimator=dianna"], "did you mean 'diana'"),
    (["compression.ratoi=0.1"], "did you mean 'ratio'"),
    (["compression.compressor=randk", "compression.ratio=0.01", "compression.estimator=plain"],
     "diverges at normal learning rates.*allow_plain"),
    (["compression.downlink=randk", "compression.downlink_ratio=0.1"], "not contractive"),
    (["compression.compressor=topk", "compression.ratio=0.01", "compression.ef21_eta=0.1", "optim.nesterov=true"],
     "Nesterov"),
    (["compression.compressor=topk", "compression.ratio=0.01", "optim.name=adamw"], "use optim.name=muon"),
    (["compression.compressor=topk", "compression.ef21_eta_sent=0.01"], "needs ef21_eta < 1"),
    (["compression.compressor=topk", "compression.ef21_eta=0.1", "compression.ef21_eta_sent=1.5"],
     r"ef21_eta_sent must be in \(0, 1\]"),
    (["compression.compressor=randk", "compression.ratio=0.1", "compression.ef21_eta_sent=0.01"],
     "applies to the ef21 estimator, not diana"),
    (["compression.ratio=0.5"], "identity.*ratio 1.0"),
])
def test_bad_compression_config_is_one_clear_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        check_config(load_config(SMOKE, overrides))
    assert "\n" not in str(err.value)


def test_plain_randk_runs_when_allowed():
    cfg = load_config(SMOKE, ["compression.compressor=randk", "compression.ratio=0.01", "compression.estimator=plain",
                              "compression.allow_plain=true"])
    check_config(cfg)
    assert cfg.compression.allow_plain


def test_one_process_has_nothing_to_compress():
    cfg = load_config(SMOKE, ["compression.compressor=topk", "compression.ratio=0.01"])
    with pytest.raises(ConfigError, match="needs ≥ 2 processes"):
        check_distributed(cfg, DistEnv())
    check_distributed(cfg, DistEnv(rank=0, world_size=2))

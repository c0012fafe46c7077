"""Compressed gradient and weight communication (docs/compression.md#formulas): the config block and its objects.

The trainer builds everything from one `compression:` block (`distlip.config.CompressionConfig`):

    check(section)                                    # ConfigError on any bad value or pair
    uplink, downlink = build(section, TorchComm(), counter)
    mine = uplink.aggregate_many(grads, step=step, owners=owner_of)   # {name: aggregate} of my tensors
    if downlink: downlink.sync_many({name: (param.data, master_or_None, owner)}, step=step)

Modules: `compressors` (tensor to message), `transport` (collectives), `estimators`
(aggregation), `downlink` (the EF21-P downlink), `accounting` (bytes per rank), `lowrank`
(PowerSGD: rank-r factors all-reduced, every rank gets every aggregate; no downlink).
"""

from __future__ import annotations

from distlip.compress.accounting import ByteCounter
from distlip.compress.compressors import Compressor, Identity, Message, RandK, TopK
from distlip.compress.downlink import Downlink
from distlip.compress.estimators import EF14, Dense, Diana, EF21Momentum, Estimator, Marina, Plain, check_pair
from distlip.compress.lowrank import LowRank, check_rank
from distlip.compress.quantisers import Quantiser, SumQuantiser
from distlip.compress.transport import Comm, SingleProcessComm, TorchComm
from distlip.config.schema import CompressionConfig
from distlip.errors import ConfigError, did_you_mean

__all__ = [
    "ByteCounter", "Comm", "Compressor", "Dense", "Diana", "Downlink", "EF14",
    "EF21Momentum", "Estimator", "Identity", "LowRank", "Marina", "Message", "Plain", "Quantiser", "RandK",
    "SingleProcessComm", "SumQuantiser", "TopK", "TorchComm", "build", "check", "estimator_name", "make_compressor",
    "validate",
]

QUANTISERS = {"int8": 8, "int4": 4}  # name: bits
SUM_QUANTISER = "int4_sum"  # int4 codes on scales the ranks share, summed in int8 (quantisers.SumQuantiser)
COMPRESSORS = ("identity", "randk", "randk_unscaled", "topk", *QUANTISERS, SUM_QUANTISER)
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Dense, Plain, Diana, Marina, EF21Momentum, EF14)
}
# Below this ratio plain scaled Rand-k (ω = 1/ratio − 1 > 9) is refused without allow_plain.
PLAIN_RANDK_MIN_RATIO = 0.1


def _known(kind: str, name: object, choices) -> str:
    if name in choices:
        return name
    raise ConfigError(f"unknown {kind} {name!r}{did_you_mean(str(name), choices)}: choose from {', '.join(choices)}")


def make_compressor(name: str, ratio: float = 1.0, *, seed: int = 0, shared_seed: bool = True,
                    world_size: int = 1) -> Compressor:
    """The compressor called `name` (one of COMPRESSORS) keeping `ratio` of the coordinates, for an
    exchange between `world_size` ranks (`int4_sum` picks its levels from it)."""
    name = _known("compressor", name, COMPRESSORS)
    if name == "identity":
        if ratio != 1.0:
            raise ConfigError(f"compressor 'identity' keeps every coordinate but ratio is {ratio!r}: "
                              "set ratio 1.0, or choose randk or topk")
        return Identity()
    if name == "topk":
        return TopK(ratio)
    if name in (*QUANTISERS, SUM_QUANTISER):
        if ratio != 1.0:
            raise ConfigError(f"compressor {name!r} quantises every coordinate but ratio is {ratio!r}: "
                              "set ratio 1.0, or choose randk or topk")
        return SumQuantiser(world_size) if name == SUM_QUANTISER else Quantiser(QUANTISERS[name])
    return RandK(ratio, scaled=name == "randk", shared_seed=shared_seed, seed=seed)


def validate(compressor: str, estimator: str, ratio: float, allow_plain: bool = False) -> None:
    """Raise ConfigError (one line naming the fix) unless this uplink configuration is sound.

    Refuses unknown names, ratios outside (0, 1], pairs `check_pair` rejects, and `plain`
    where it is known to fail unless `allow_plain`: scaled Rand-k below ratio 0.1 (variance
    ω = d/k − 1 diverges at normal learning rates, docs/compression.md#formulas) and Top-k (biased, and without
    error feedback the bias can stall it). Plain unscaled Rand-k is allowed: in expectation it
    is the gradient times k/d, i.e. SGD at a k/d smaller learning rate.
    """
    comp = make_compressor(compressor, ratio)
    cls = ESTIMATORS[_known("estimator", estimator, ESTIMATORS)]
    check_pair(cls, comp)
    if cls is not Plain or allow_plain:
        return
    if isinstance(comp, RandK) and comp.scaled and ratio < PLAIN_RANDK_MIN_RATIO:
        raise ConfigError(
            f"plain scaled randk at ratio {ratio} has variance ω ≈ {1 / ratio - 1:.0f}×‖g‖² and diverges at "
            "normal learning rates with gradient-scaled steps (under Muon's fixed-norm step it trains, "
            "far behind dense): use estimator diana or marina, or set allow_plain: true"
        )
    if isinstance(comp, TopK):
        raise ConfigError(
            "plain 'topk' has no error feedback, so its bias can stall training: "
            "use estimator ef21 or ef14, or set allow_plain: true"
        )


def check(section: CompressionConfig) -> None:
    """Raise ConfigError (one line naming the fix) unless the `compression:` block is sound."""
    if section.compressor == LowRank.name:
        _check_lowrank(section)
    else:
        if section.rank is not None:
            raise ConfigError(f"compression.rank={section.rank} applies to compressor lowrank, not "
                              f"{section.compressor!r}: drop it, or set compression.compressor=lowrank")
        _check_elementwise(section)
    if section.downlink in (*QUANTISERS, SUM_QUANTISER):
        raise ConfigError(f"compression.downlink={section.downlink} is not supported (the owners' broadcast takes "
                          "topk or randk_unscaled): set compression.downlink to identity, topk or randk_unscaled")
    if isinstance(section.warmup_steps, bool) or not isinstance(section.warmup_steps, int) or section.warmup_steps < 0:
        raise ConfigError(f"compression.warmup_steps must be an integer ≥ 0, got {section.warmup_steps!r}")
    build(section)  # the constructors check the remaining options (marina_p, ef21_eta, downlink)


def _check_lowrank(section: CompressionConfig) -> None:
    """lowrank carries its own error feedback and sends no weights back: refuse what it cannot honour."""
    check_rank(section.rank, section.ratio)
    if section.estimator is not None:
        raise ConfigError(f"compressor lowrank carries its own error feedback (PowerSGD), so estimator "
                          f"{section.estimator!r} does not apply: leave compression.estimator unset")
    if section.downlink != "identity":
        raise ConfigError("compressor lowrank gives every rank the aggregate, and every rank steps every matrix, "
                          "so no weights are sent back: leave compression.downlink=identity")
    if section.ef21_eta != 1.0:
        raise ConfigError(f"compression.ef21_eta={section.ef21_eta} is EF21's momentum, which compressor lowrank "
                          "does not use (Muon keeps its own): drop it")


def _check_elementwise(section: CompressionConfig) -> None:
    if section.compressor not in COMPRESSORS:
        _known("compressor", section.compressor, (*COMPRESSORS, LowRank.name))
    validate(section.compressor, estimator_name(section), section.ratio, section.allow_plain)


def estimator_name(section: CompressionConfig) -> str:
    """The estimator the block names, or its compressor's default: dense, diana (randk), lowrank
    (the low-rank compressor's own error feedback) or ef21."""
    if section.compressor == LowRank.name:
        return LowRank.name
    if section.estimator is not None:
        return section.estimator
    if section.compressor == "identity":
        return "dense"
    return "diana" if section.compressor == "randk" else "ef21"


def build(section: CompressionConfig, comm: Comm | None = None,
          counter: ByteCounter | None = None) -> tuple[Estimator | LowRank, Downlink | None]:
    """The uplink estimator and, unless the downlink is identity, the Downlink, sharing `counter`."""
    counter = counter if counter is not None else ByteCounter()
    if section.compressor == LowRank.name:
        return LowRank(section.rank, section.ratio, comm, warmup_steps=section.warmup_steps, seed=section.seed,
                       counter=counter), None
    compressor = make_compressor(section.compressor, section.ratio, seed=section.seed, shared_seed=section.shared_seed,
                                 world_size=1 if comm is None else comm.world_size)
    cls = ESTIMATORS[estimator_name(section)]
    options = ({"p": section.marina_p, "same_batch": section.marina_same_batch} if cls is Marina
               else {"eta": section.ef21_eta, "eta_sent": section.ef21_eta_sent} if cls is EF21Momentum else {})
    uplink = cls(compressor, comm, warmup_steps=section.warmup_steps, seed=section.seed, counter=counter,
                 exact_own=section.exact_own, **options)
    downlink = None
    if section.downlink != "identity":
        down = make_compressor(section.downlink, section.downlink_ratio, seed=section.seed,
                               shared_seed=section.shared_seed)
        downlink = Downlink(down, comm, warmup_steps=section.warmup_steps, counter=counter)
    return uplink, downlink

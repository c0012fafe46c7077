"""Block quantisers (docs/compression.md#compressors-compresscompressorspy): every coordinate travels,
rounded to one of 2L + 1 levels in blocks of `QUANT_BLOCK` values sharing one fp32 scale.

- `Quantiser` (`int8`, `int4`): each rank scales each block by its own largest magnitude, so
  messages cannot be summed on the way; they are gathered (an all-gather grows as M − 1).
- `SumQuantiser` (`int4_sum`): the ranks first agree on each block's scale (an all-reduce of the
  block maxima), then quantise on it, so the integer codes of all ranks add up: one all-reduce
  of int8 codes carries the sum (`transport.mean_many`). Its levels are chosen from the number of
  ranks M so that no sum can overflow int8 (`sum_levels`).

Both round to nearest, with no randomness: every coordinate is off by at most half a step s, so a
block of B values with largest magnitude a loses at most B·s²/4 = B/(4L²)·a² ≤ B/(4L²)·‖x_block‖²
when s = a/L: contractive with δ = 1 − B/(4L²), a pair for error feedback (EF14, EF21). On a
shared scale a rank's own values may all lie below s/2, and then its block goes as zeros: the
error is still at most the value (it never expands: ‖C(x) − x‖ ≤ ‖x‖) but δ is 0 in the worst
case; error feedback keeps such a block in the residual until it reaches half a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distlip.compress.compressors import Compressor, Message
from distlip.errors import ConfigError

QUANT_BLOCK = 64  # values per absmax scale: 4 bytes of scale per 64 values
SUM_BOUND = 127  # the largest int8: the sum of every rank's code must stay within ±SUM_BOUND
SUM_LEVELS = 7  # int4_sum's levels while the ranks allow them (4-bit codes, as int4)


def blocks_of(d: int) -> int:
    """Number of `QUANT_BLOCK`-value blocks (and fp32 scales) for d coordinates."""
    return -(-d // QUANT_BLOCK)


def block_absmax(x: Tensor) -> Tensor:
    """(⌈d/B⌉,) fp32 largest magnitude of each block of the flat (d,) `x` (the last block padded with 0)."""
    return torch.nn.functional.pad(x.float().abs(), (0, -x.numel() % QUANT_BLOCK)).view(-1, QUANT_BLOCK).amax(1)


def sum_levels(world_size: int) -> int:
    """L of `int4_sum` on `world_size` ranks: 7 (the 4-bit codes of int4) while world_size·7 ≤ 127,
    i.e. up to 18 ranks, so the int8 sum of M codes in [−L, L] cannot overflow; ⌊127/M⌋ beyond
    that (fewer levels: the sum dtype, not L, sets the bytes); no level is left past 127 ranks."""
    if not 1 <= world_size <= SUM_BOUND:
        raise ConfigError(f"compressor int4_sum sums int8 codes, which holds at most {SUM_BOUND} ranks' codes, "
                          f"but there are {world_size} ranks: use compressor int4 (gathered) or fewer ranks")
    return min(SUM_LEVELS, SUM_BOUND // world_size)


class Quantiser(Compressor):
    """Blocks of QUANT_BLOCK consecutive coordinates, each scaled by its largest magnitude a to
    integers in [−L, L] (L = 2^(bits−1) − 1: 127 at 8 bits, 7 at 4), rounded to nearest:
    δ = 1 − B/(4L²) (0.996 at 8 bits, 0.67 at 4). The message is one uint8 payload: the fp32
    scales, then the codes (one byte each at 8 bits, two per byte at 4). Scales differ between
    ranks, so messages are gathered, not summed.
    """

    contractive = True

    def __init__(self, bits: int) -> None:
        super().__init__(1.0)
        if bits not in (4, 8):
            raise ConfigError(f"quantiser bits must be 4 or 8, got {bits!r}: use compressor int8 or int4")
        self.bits, self.levels, self.name = bits, 2 ** (bits - 1) - 1, f"int{bits}"

    def __repr__(self) -> str:
        return f"Quantiser(bits={self.bits})"

    def keeps_all(self, d: int) -> bool:
        return False

    def delta(self, d: int) -> float:
        return 1.0 - min(QUANT_BLOCK, d) / (4 * self.levels ** 2)

    def message_bytes(self, d: int, dtype: torch.dtype) -> int:
        """Scales (4 bytes per block) plus codes (d bytes at 8 bits, ⌈d/2⌉ at 4)."""
        return 4 * blocks_of(d) + (d if self.bits == 8 else -(-d // 2))

    def compress(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Message:
        return Message(self.encode(x, block_absmax(x)), codec=self, dtype=x.dtype)

    def encode(self, x: Tensor, absmax: Tensor) -> Tensor:
        """The uint8 payload of the flat (d,) `x` on blocks whose largest magnitudes are `absmax`
        ((⌈d/B⌉,) fp32, at least x's own): the scales absmax/L, then round(x/scale) ∈ [−L, L]."""
        d = x.numel()
        blocks = torch.nn.functional.pad(x.float(), (0, -d % QUANT_BLOCK)).view(-1, QUANT_BLOCK)
        scale = self.scales(absmax)
        codes = (blocks / scale[:, None]).round_().clamp_(-self.levels, self.levels).to(torch.int8).view(-1)[:d]
        if self.bits == 4:  # two codes per byte, offset to 1..15
            nibbles = torch.nn.functional.pad(codes.to(torch.uint8) + 8, (0, d % 2)).view(-1, 2)
            packed = nibbles[:, 0] | (nibbles[:, 1] << 4)
        else:
            packed = codes.view(torch.uint8)
        return torch.cat([scale.view(torch.uint8), packed])

    def scales(self, absmax: Tensor) -> Tensor:
        """fp32 step per block, a/L, from the blocks' largest magnitudes a (1 for an all-zero block: codes 0)."""
        scale = absmax / self.levels
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def dequantise(self, payload: Tensor, d: int, dtype: torch.dtype) -> Tensor:
        """The dense (d,) tensor of `dtype` that the uint8 `payload` (from `encode`) stands for."""
        n = blocks_of(d)
        scale = payload[:4 * n].clone().view(torch.float32)  # a copy: the payload may sit at any byte offset
        packed = payload[4 * n:]
        if self.bits == 4:
            codes = torch.stack([packed & 15, packed >> 4], 1).view(-1)[:d].to(torch.int8) - 8
        else:
            codes = packed.view(torch.int8)
        values = torch.nn.functional.pad(codes.float(), (0, n * QUANT_BLOCK - d)).view(n, QUANT_BLOCK)
        return (values * scale[:, None]).view(-1)[:d].to(dtype)


class SumQuantiser(Quantiser):
    """`int4_sum`: block quantisation on scales every rank shares, so that the codes add up.

    `compress` only marks the values (a `shared` message holding them); the exchange
    (`transport.mean_many`) takes the maximum of each block's largest magnitude over the ranks,
    then `encode`s every rank's values on those scales, s = a/L with L = `sum_levels(world_size)`,
    into int8 codes in [−L, L], and sums the codes with one int8 all-reduce: exact while
    M·L ≤ 127. The message then holds this rank's own payload (shared scales, its int8 codes),
    which error feedback subtracts. The mean is Σ_m codes_m · s / M.
    """

    shared = True

    def __init__(self, world_size: int) -> None:
        super().__init__(8)  # the payload's codes are one int8 each, as int8's
        self.world_size, self.levels, self.name = world_size, sum_levels(world_size), "int4_sum"

    def __repr__(self) -> str:
        return f"SumQuantiser(world_size={self.world_size})"

    def delta(self, d: int) -> float:
        """0: on the shared scale a rank's whole block may round to zeros (module docstring); against
        the shared maxima the error is at most B/(4L²)·a² per block, as `Quantiser`'s."""
        return 0.0

    def compress(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Message:
        return Message(x.float().clone(), shared=True, codec=self, dtype=x.dtype)

    def decode_sum(self, absmax: Tensor, summed: Tensor, dtype: torch.dtype) -> Tensor:
        """Σ_m codes_m · s as a dense (d,) tensor of `dtype`, from the shared block maxima (⌈d/B⌉,)
        and the (d,) int8 sum of every rank's codes."""
        scale = self.scales(absmax)
        return self.dequantise(torch.cat([scale.view(torch.uint8), summed.view(torch.uint8)]), summed.numel(), dtype)

"""Compressors: a flat tensor of d coordinates to a message and back (docs/compression.md#formulas).

Every compressor keeps k = max(1, round(ratio·d)) coordinates of a flat (d,) tensor
and puts them in a `Message`: the kept values in the tensor's dtype, plus their int32
coordinates when the receiver cannot derive them itself. A compressor whose k equals d
sends the tensor unchanged, so ratio 1.0 is the identity bit for bit.

Two families (pairs with estimators are checked in `estimators.py`):
- unbiased, E[Q(x)] = x and E‖Q(x) − x‖² ≤ ω‖x‖²: Identity (ω = 0), scaled Rand-k (ω = d/k − 1);
- contractive, ‖C(x) − x‖² ≤ (1 − δ)‖x‖² (in expectation for random ones): Identity
  (δ = 1), Top-k and unscaled Rand-k (δ = k/d), and the block quantisers of `quantisers.py`.

Random masks come from a private `torch.Generator` seeded from (seed, step, tensor id),
never from the global RNG, so training randomness is untouched and every rank that
shares the seed picks the same coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distlip.errors import ConfigError
from distlip.seeds import stream_seed

INDEX_DTYPE = torch.int32
INDEX_BYTES = 4


@dataclass
class Message:
    """What one rank contributes for one tensor.

    values:  (k,) kept values in the tensor's dtype, already scaled; (d,) for a dense message.
    indices: (k,) int32 coordinates of `values`; None for a dense message.
    shared:  every rank derives the same indices from the shared seed, so they are not
             sent and the values of all ranks can be summed position by position (a quantiser's:
             the ranks agree on its scales in the exchange, and its codes are summed).
    """

    values: Tensor
    indices: Tensor | None = None
    shared: bool = False
    codec: Compressor | None = None  # a block quantiser (compress/quantisers.py): `values` is its payload for a
    # `dtype` tensor (uint8; before the exchange of a `shared` one, the values themselves)
    dtype: torch.dtype | None = None

    @property
    def whole(self) -> bool:
        """The tensor itself, every coordinate as it is."""
        return self.indices is None and self.codec is None

    @property
    def tensor_dtype(self) -> torch.dtype:
        """The dtype of the tensor the message stands for."""
        return self.dtype or self.values.dtype

    @property
    def itemsize(self) -> int:
        """Bytes per coordinate of the tensor the message stands for."""
        return self.tensor_dtype.itemsize


class Compressor:
    """Base class: keeps k = max(1, round(ratio·d)) of d coordinates.

    Subclasses set `unbiased`, `contractive` and `shared` and implement `_select`.
    """

    name = ""
    unbiased = False
    contractive = False
    shared = False  # indices derivable on every rank (never sent)

    def __init__(self, ratio: float = 1.0) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ConfigError(
                f"compression ratio must be in (0, 1], got {ratio!r}: use e.g. 0.01 to keep 1% of coordinates"
            )
        self.ratio = float(ratio)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"

    def k(self, d: int) -> int:
        """Number of coordinates kept out of d."""
        return min(d, max(1, round(self.ratio * d)))

    def keeps_all(self, d: int) -> bool:
        """True when nothing is dropped: the message is the tensor itself."""
        return self.k(d) == d

    def omega(self, d: int) -> float | None:
        """Variance parameter ω of an unbiased compressor on d coordinates; None if biased."""
        return None

    def delta(self, d: int) -> float | None:
        """Contraction parameter δ of a contractive compressor on d coordinates; None if not contractive."""
        return None

    def compress(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Message:
        """Message for the flat (d,) tensor `x` at optimiser step `step` on rank `rank`."""
        d = x.numel()
        if self.keeps_all(d):
            return Message(x.clone())
        indices = self._select(x, step=step, tensor_id=tensor_id, rank=rank)
        values = x[indices]
        scale = self._scale(d)
        if scale != 1.0:
            values.mul_(scale)
        return Message(values, indices, self.shared)

    def decompress(self, message: Message, d: int) -> Tensor:
        """The dense (d,) tensor a message stands for (zeros off its support)."""
        if message.whole:
            return message.values.clone()
        return self.add_into(message.values.new_zeros(d, dtype=message.tensor_dtype), message)

    @staticmethod
    def add_into(target: Tensor, message: Message, alpha: float = 1.0) -> Tensor:
        """target += alpha·decompress(message), in place on the flat (d,) `target`, without a dense temporary
        (one for a quantised message)."""
        if message.codec is not None:
            return target.add_(message.codec.dequantise(message.values, target.numel(), target.dtype), alpha=alpha)
        if message.indices is None:
            return target.add_(message.values, alpha=alpha)
        # The indices of one message are distinct, so index_add_ is deterministic on every device.
        return target.index_add_(0, message.indices, message.values, alpha=alpha)

    def message_bytes(self, d: int, dtype: torch.dtype) -> int:
        """Exact bytes of one message for d coordinates of `dtype`: values, plus int32 indices when sent."""
        if self.keeps_all(d):
            return d * dtype.itemsize
        k = self.k(d)
        return k * dtype.itemsize + (0 if self.shared else k * INDEX_BYTES)

    def empty_message(
        self, d: int, dtype: torch.dtype, device: torch.device, *, step: int, tensor_id: int | str, rank: int
    ) -> Message:
        """Buffers to receive the message that rank `rank` compresses at `step` (indices filled in when shared)."""
        if self.keeps_all(d):
            return Message(torch.empty(d, dtype=dtype, device=device))
        k = self.k(d)
        if self.shared:  # only RandK with a shared seed gets here: it derives the mask itself
            indices = self.mask(d, step=step, tensor_id=tensor_id, rank=rank, device=device)
        else:
            indices = torch.empty(k, dtype=INDEX_DTYPE, device=device)
        return Message(torch.empty(k, dtype=dtype, device=device), indices, self.shared)

    def _scale(self, d: int) -> float:
        return 1.0

    def _select(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Tensor:
        raise NotImplementedError


class Identity(Compressor):
    """Sends every coordinate: ω = 0, δ = 1."""

    name = "identity"
    unbiased = True
    contractive = True
    shared = True

    def __init__(self) -> None:
        super().__init__(1.0)

    def __repr__(self) -> str:
        return "Identity()"

    def omega(self, d: int) -> float:
        return 0.0

    def delta(self, d: int) -> float:
        return 1.0


class RandK(Compressor):
    """Uniform random k-subset S of the d coordinates.

    scaled=True: values times d/k, unbiased with ω = d/k − 1 (name "randk").
    scaled=False: values as they are, contractive in expectation with δ = k/d ("randk_unscaled").
    shared_seed=True: S depends on (seed, step, tensor_id) only, so all ranks pick the same S;
    only the k values are sent and they are summed in place (all-reduce or reduce-scatter).
    shared_seed=False mixes the rank in: independent masks (variance of the mean falls as 1/M)
    that travel as (values, indices) (all-gather or all-to-all).
    """

    def __init__(self, ratio: float, scaled: bool = True, shared_seed: bool = True, seed: int = 0) -> None:
        super().__init__(ratio)
        self.scaled = scaled
        self.shared_seed = shared_seed
        self.seed = seed
        self.name = "randk" if scaled else "randk_unscaled"
        self.unbiased = scaled
        self.contractive = not scaled
        self.shared = shared_seed

    def __repr__(self) -> str:
        return f"RandK(ratio={self.ratio}, scaled={self.scaled}, shared_seed={self.shared_seed}, seed={self.seed})"

    def omega(self, d: int) -> float | None:
        return d / self.k(d) - 1.0 if self.scaled else None

    def delta(self, d: int) -> float | None:
        return None if self.scaled else self.k(d) / d

    def mask(
        self, d: int, *, step: int, tensor_id: int | str, rank: int, device: torch.device | str | None = None
    ) -> Tensor:
        """(k,) int32 coordinates of S, uniform without replacement; `rank` is ignored with a shared seed.

        The same device type gives the same S on every rank. Costs O(k log k) when k ≤ d/4 (see
        `sample_without_replacement`), one randperm of d otherwise.
        """
        parts = (self.seed, step, tensor_id) if self.shared_seed else (self.seed, step, tensor_id, rank)
        generator = torch.Generator(device=device)
        generator.manual_seed(stream_seed(*parts))
        return sample_without_replacement(d, self.k(d), generator, device).to(INDEX_DTYPE)

    def _scale(self, d: int) -> float:
        return d / self.k(d) if self.scaled else 1.0

    def _select(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Tensor:
        return self.mask(x.numel(), step=step, tensor_id=tensor_id, rank=rank, device=x.device)


def sample_without_replacement(d: int, k: int, generator: torch.Generator,
                               device: torch.device | str | None = None) -> Tensor:
    """k distinct integers from [0, d), every k-subset equally likely, as (k,) int64.

    For k ≤ d/4: draw uniform integers with replacement and keep the first k distinct ones in
    draw order, which is sequential sampling without replacement (uniform), in O(k log k)
    rather than a randperm's O(d): 124M coordinates at 1% take milliseconds instead of
    seconds. About k²/2d draws repeat, so a few more than k are drawn, and more if needed.
    """
    if 4 * k > d:
        return torch.randperm(d, generator=generator, device=device)[:k]
    drawn = torch.empty(0, dtype=torch.long, device=device)
    while True:
        extra = k - drawn.numel() + k * k // d + 16
        more = torch.randint(d, (extra,), generator=generator, device=device)
        drawn = torch.cat([drawn, more])
        values, inverse = torch.unique(drawn, return_inverse=True)
        if values.numel() >= k:
            break
    positions = torch.arange(drawn.numel(), device=device)
    first = torch.full_like(values, drawn.numel()).scatter_reduce_(0, inverse, positions, "amin")
    return values[first.argsort()[:k]]


class TopK(Compressor):
    """The k largest magnitudes, sent as (values, int32 indices): contractive with δ = k/d."""

    name = "topk"
    contractive = True

    def delta(self, d: int) -> float:
        return self.k(d) / d

    def _select(self, x: Tensor, *, step: int, tensor_id: int | str, rank: int) -> Tensor:
        return top_magnitudes(x, self.k(x.numel())).to(INDEX_DTYPE)


# torch.topk on the CPU costs about 13 ns per coordinate (31 ms for a 768×3072 matrix on one
# thread). A threshold from a random sample first cuts the input to about 2k candidates, which
# is 3-4× faster. On GPUs torch.topk is fast, and a candidate count known only on the device
# would stall the stream, so it runs there as it is.
FILTER_MIN_D = 1 << 17
FILTER_SAMPLE = 1 << 16


def top_magnitudes(x: Tensor, k: int) -> Tensor:
    """Indices (int64, in no particular order) of the k largest |x| of a flat (d,) tensor: the
    set torch.topk picks, up to which of several equal magnitudes at the k-th place are kept."""
    a = x.abs()
    d = a.numel()
    if a.device.type != "cpu" or d < FILTER_MIN_D or 8 * k > d:
        return torch.topk(a, k, sorted=False).indices
    # The seed only sets how many candidates pass (≈ 2k ± 6% at any k ≤ d/8), never which win.
    sample = a[torch.randint(d, (FILTER_SAMPLE,), generator=torch.Generator().manual_seed(d))]
    threshold = sample.kthvalue(FILTER_SAMPLE - 2 * k * FILTER_SAMPLE // d).values
    above = (a > threshold).nonzero().squeeze(1)
    if above.numel() >= k:
        return above[torch.topk(a[above], k, sorted=False).indices]
    # Fewer than k above it: the threshold is the k-th magnitude itself (a sparse or tied input,
    # say), and any of its ties complete the set, or the sample missed the tail.
    ties = (a == threshold).nonzero().squeeze(1)
    if above.numel() + ties.numel() < k:
        return torch.topk(a, k, sorted=False).indices
    return torch.cat([above, ties[:k - above.numel()]])

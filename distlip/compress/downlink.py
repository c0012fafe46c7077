"""The EF21-P downlink (docs/compression.md#formulas): owners send compressed weight shifts back."""

from __future__ import annotations

from torch import Tensor

from distlip.compress.accounting import ByteCounter
from distlip.compress.compressors import Compressor, Message
from distlip.compress.transport import Comm, SingleProcessComm, broadcast_messages
from distlip.errors import ConfigError


class Downlink:
    """EF21-P model-shift compression of the weights each tensor's owner sends back.

    Every rank keeps a working copy w (the module weights the next forward uses); the owner
    also holds the master x⁺ it has just stepped and constrained. The owner broadcasts
    C(x⁺ − w) and every rank, owner included, sets w ← w + C(x⁺ − w), so all working copies
    stay bit-identical and track x⁺. Gradients are taken at w; the constraint and the
    Lipschitz certificate are checked on x. Stateless: w lives in the module, x in the
    optimiser. C must be contractive (an unbiased scaled Rand-k would blow w up).
    """

    def __init__(
        self,
        compressor: Compressor,
        comm: Comm | None = None,
        *,
        warmup_steps: int = 0,
        counter: ByteCounter | None = None,
    ) -> None:
        if not compressor.contractive:
            raise ConfigError(
                f"downlink compressor {compressor.name!r} is not contractive: use topk or randk_unscaled"
            )
        self.compressor = compressor
        self.comm = comm if comm is not None else SingleProcessComm()
        self.warmup_steps = warmup_steps
        self.counter = counter if counter is not None else ByteCounter()

    def sync_many(self, tensors: dict[str, tuple[Tensor, Tensor | None, int]], *, step: int) -> None:
        """Update this rank's working copies in place: {name: (weights, master, owner)}.

        weights: the contiguous working copy w (any shape); master: the owner's x⁺ (same
        shape, any float dtype), None on other ranks; owner: the rank that holds x. One
        broadcast per owner carries all its tensors. Dense (w ← x⁺ exactly) during warm-up and
        when the compressor keeps everything. Every rank passes the same names and owners.
        """
        for owner in dict.fromkeys(o for _, _, o in tensors.values()):
            names = [n for n, (_, _, o) in tensors.items() if o == owner]
            messages = [self._message(n, *tensors[n][:2], owner, step) for n in names]
            flats = [tensors[n][0].view(-1) for n in names]
            broadcast_messages(self.comm, messages, [f.numel() for f in flats], owner=owner, counter=self.counter)
            for flat, message in zip(flats, messages):
                if message.indices is not None:  # dense messages were received into w itself
                    self.compressor.add_into(flat, message)

    def _message(self, name: str, weights: Tensor, master: Tensor | None, owner: int, step: int) -> Message:
        """The owner's message for one tensor, or the buffers another rank receives it into."""
        flat = weights.view(-1)
        d = flat.numel()
        is_owner = self.comm.rank == owner
        if is_owner and master is None:
            raise ValueError(f"rank {owner} owns {name!r} and must pass its master weights")
        if step < self.warmup_steps or self.compressor.keeps_all(d):
            if is_owner:
                flat.copy_(master.reshape(-1))
            return Message(flat)
        tensor_id = f"{name}/downlink"  # masks independent of the uplink's for the same tensor
        if is_owner:
            shift = (master.reshape(-1) - flat).to(flat.dtype)
            return self.compressor.compress(shift, step=step, tensor_id=tensor_id, rank=owner)
        return self.compressor.empty_message(d, flat.dtype, flat.device, step=step, tensor_id=tensor_id, rank=owner)

"""Gradient estimators over compressed communication (SPEC §5), and the EF21-P downlink.

An estimator turns each rank's local gradient of one tensor into the aggregate that every
rank steps with; the aggregate is bit-identical on all ranks. State is kept per tensor,
keyed by the name passed to `aggregate`, as flat (d,) tensors in the gradient's dtype.
Fields ending in `_bar` or `_hat` are the same on every rank; the others are this rank's
own, so a checkpoint stores `state_dict()` per rank (after a change of world size, drop
it: the next call re-initialises densely).

Dense rounds: the first call for a tensor, every step below `warmup_steps`, and every call
whose compressor keeps all d coordinates run the estimator's dense path: one all-reduce,
after which the reference state equals what the identity compressor would leave (h = g
for DIANA, u = v for EF21, e = 0 for EF14). So ratio 1.0 reproduces `Dense` bit for bit.

Valid (estimator, compressor) pairs, enforced by `check_pair`:
- Dense: identity only (it sends everything anyway);
- Diana, Marina: unbiased compressors (identity, scaled randk): their variance reduction
  relies on E[Q(x)] = x, and a biased Top-k would bias the shifts for good;
- EF21Momentum, EF14: contractive compressors (identity, topk, randk_unscaled): error
  feedback needs ‖C(x) − x‖ < ‖x‖, which scaled Rand-k violates (its error is ω‖x‖² ≥ ‖x‖²
  once k ≤ d/2);
- Plain: anything, but the config layer only allows it when asked for (see `validate`).
Compress gradients or momentum, never Muon's orthogonalised update (SPEC §4).
"""

from __future__ import annotations

import random

from torch import Tensor

from distlip.compress.accounting import ByteCounter
from distlip.compress.compressors import Compressor, Identity, Message, stream_seed
from distlip.compress.transport import Comm, SingleProcessComm, broadcast_message, mean_dense, mean_messages
from distlip.errors import ConfigError

State = dict[str, Tensor]


class Estimator:
    """Base class. Subclasses implement `_dense` and `_compressed` on flat (d,) tensors.

    compressor: what each rank sends (default Identity); comm: the collectives (default one
    process); warmup_steps: steps below this are dense; seed: for shared random choices
    other than masks (MARINA's coin); counter: where bytes are recorded (default a new one).
    """

    name = ""
    requires = "any"  # "any", "unbiased", "contractive" or "identity"

    def __init__(
        self,
        compressor: Compressor | None = None,
        comm: Comm | None = None,
        *,
        warmup_steps: int = 0,
        seed: int = 0,
        counter: ByteCounter | None = None,
    ) -> None:
        self.compressor = compressor if compressor is not None else Identity()
        check_pair(self, self.compressor)
        self.comm = comm if comm is not None else SingleProcessComm()
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.counter = counter if counter is not None else ByteCounter()
        self._state: dict[str, State] = {}

    def aggregate(self, name: str, grad: Tensor, *, step: int) -> Tensor:
        """The aggregate for tensor `name` at optimiser `step`, shaped like `grad` (a new tensor).

        Every rank must call this for the same names and steps, in the same order.
        """
        flat = grad.reshape(-1)
        d = flat.numel()
        dense = (
            name not in self._state
            or step < self.warmup_steps
            or self.compressor.keeps_all(d)
            or self._dense_round(name, step, d)
        )
        state = self._state.setdefault(name, {})
        out = self._dense(state, flat) if dense else self._compressed(state, flat, name, step)
        return out.view_as(grad)

    def state_dict(self) -> dict[str, State]:
        """Per-tensor state keyed by name: {name: {field: (d,) tensor}} (references, not copies)."""
        return self._state

    def load_state_dict(self, state: dict[str, State]) -> None:
        self._state = {name: {key: t.clone() for key, t in fields.items()} for name, fields in state.items()}

    def _dense_round(self, name: str, step: int, d: int) -> bool:
        """Whether this step is an extra dense round (MARINA's coin); decided identically on all ranks."""
        return False

    def _dense(self, state: State, g: Tensor) -> Tensor:
        raise NotImplementedError

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        raise NotImplementedError

    def _mean(self, x: Tensor) -> Tensor:
        return mean_dense(self.comm, x, self.counter)

    def _compress(self, x: Tensor, name: str, step: int) -> Message:
        return self.compressor.compress(x, step=step, tensor_id=name, rank=self.comm.rank)

    def _mean_of(self, message: Message, d: int) -> Tensor:
        return mean_messages(self.comm, message, d, self.counter)


def check_pair(estimator: Estimator | type[Estimator], compressor: Compressor) -> None:
    """Raise ConfigError when `compressor` does not meet what `estimator` needs (see the module docstring)."""
    requires = estimator.requires
    ok = {
        "any": True,
        "identity": isinstance(compressor, Identity),
        "unbiased": compressor.unbiased,
        "contractive": compressor.contractive,
    }[requires]
    if ok:
        return
    fixes = {
        "identity": "set compressor: identity, or pick an estimator (diana, marina, ef21, ef14)",
        "unbiased": "use compressor randk (scaled), or estimator ef21/ef14 with this compressor",
        "contractive": "use topk or randk_unscaled, or estimator diana/marina with scaled randk",
    }
    raise ConfigError(
        f"estimator {estimator.name!r} needs {'an' if requires != 'contractive' else 'a'} {requires} compressor, "
        f"got {compressor.name!r}: {fixes[requires]}"
    )


class Dense(Estimator):
    """Plain all-reduce mean of the gradients: the oracle every estimator is compared with."""

    name = "dense"
    requires = "identity"

    def _dense(self, state: State, g: Tensor) -> Tensor:
        return self._mean(g)


class Plain(Estimator):
    """Mean of Q(g_m) with no variance reduction or error feedback.

    With scaled Rand-k its variance is ω = d/k − 1 times the gradient's: at 1% it diverges at
    ordinary learning rates (SPEC §5). Kept for comparisons; `validate` refuses it unless asked.
    """

    name = "plain"

    def _dense(self, state: State, g: Tensor) -> Tensor:
        return self._mean(g)

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        return self._mean_of(self._compress(g, name, step), g.numel())


class Diana(Estimator):
    """DIANA: compress the difference to a learned shift, Δ_m = Q(g_m − h_m).

    ĝ = h̄ + mean Δ; h_m += αΔ_m; h̄ += α·mean Δ with α = 1/(ω+1). The shifts learn each
    rank's gradient, so the compressed part, and its variance, shrinks as training settles.
    State: h (this rank's shift), h_bar (the mean shift, the same on all ranks).
    """

    name = "diana"
    requires = "unbiased"

    def _dense(self, state: State, g: Tensor) -> Tensor:
        mean = self._mean(g)
        state["h"] = g.clone()
        state["h_bar"] = mean.clone()
        return mean

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        d = g.numel()
        alpha = 1.0 / (self.compressor.omega(d) + 1.0)
        message = self._compress(g - state["h"], name, step)
        mean_delta = self._mean_of(message, d)
        out = state["h_bar"] + mean_delta
        self.compressor.add_into(state["h"], message, alpha)
        state["h_bar"].add_(mean_delta, alpha=alpha)
        return out


class Marina(Estimator):
    """MARINA: with probability p a dense round, else ĝ ← ĝ_prev + mean Q(g_m(x⁺) − g_m(x)).

    Practical one-minibatch variant: g_m(x) is this rank's previous local gradient, taken at
    the previous weights on the previous minibatch, so the difference also carries minibatch
    noise (the original evaluates both points on one minibatch, which costs a second
    backward pass). The coin is drawn per tensor from (seed, step, name), the same on every
    rank, which spreads the dense rounds of different tensors over different steps.
    p defaults to k/d. State: g_prev (this rank's last gradient), g_hat (the same on all ranks).
    """

    name = "marina"
    requires = "unbiased"

    def __init__(self, compressor: Compressor | None = None, comm: Comm | None = None, *, p: float | None = None, **kw):
        super().__init__(compressor, comm, **kw)
        if p is not None and not 0.0 < p <= 1.0:
            raise ConfigError(f"marina_p must be in (0, 1], got {p!r}: leave it unset for k/d")
        self.p = p

    def _dense_round(self, name: str, step: int, d: int) -> bool:
        p = self.p if self.p is not None else self.compressor.k(d) / d
        return random.Random(stream_seed(self.seed, step, name, "marina")).random() < p

    def _dense(self, state: State, g: Tensor) -> Tensor:
        mean = self._mean(g)
        state["g_prev"] = g.clone()
        state["g_hat"] = mean.clone()
        return mean

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        message = self._compress(g - state["g_prev"], name, step)
        state["g_hat"].add_(self._mean_of(message, g.numel()))
        state["g_prev"].copy_(g)
        return state["g_hat"].clone()


class EF21Momentum(Estimator):
    """EF21 with momentum: v_m ← (1−η)v_m + η·g_m; c_m = C(v_m − u_m); u_m += c_m; ū += mean c_m.

    Returns ū. With η = 1 (default) v is the gradient itself and this is plain EF21; the
    optimiser's own momentum then applies to ū. With η < 1 ū is already an EMA momentum
    (β = 1 − η): compress momentum, and do not apply momentum to ū again. v starts at the
    first gradient. State: v (η < 1 only), u (this rank's), u_bar (the same on all ranks).
    """

    name = "ef21"
    requires = "contractive"

    def __init__(self, compressor: Compressor | None = None, comm: Comm | None = None, *, eta: float = 1.0, **kw):
        super().__init__(compressor, comm, **kw)
        if not 0.0 < eta <= 1.0:
            raise ConfigError(f"ef21_eta must be in (0, 1], got {eta!r}: use 1.0 for plain EF21")
        self.eta = eta

    def _momentum(self, state: State, g: Tensor) -> Tensor:
        if self.eta == 1.0:
            return g
        v = state.get("v")
        if v is None:
            state["v"] = v = g.clone()
        else:
            v.lerp_(g, self.eta)
        return v

    def _dense(self, state: State, g: Tensor) -> Tensor:
        v = self._momentum(state, g)
        mean = self._mean(v)
        state["u"] = v.clone()
        state["u_bar"] = mean.clone()
        return mean

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        v = self._momentum(state, g)
        message = self._compress(v - state["u"], name, step)
        self.compressor.add_into(state["u"], message)
        state["u_bar"].add_(self._mean_of(message, g.numel()))
        return state["u_bar"].clone()


class EF14(Estimator):
    """Classic error feedback: p = g + e; c = C(p); e ← p − c; aggregate = mean of c.

    State: e (this rank's residual; absent means zero, as after a dense round).
    """

    name = "ef14"
    requires = "contractive"

    def _dense(self, state: State, g: Tensor) -> Tensor:
        e = state.pop("e", None)
        return self._mean(g if e is None else g + e)

    def _compressed(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        e = state.get("e")
        p = g.clone() if e is None else g + e
        message = self._compress(p, name, step)
        state["e"] = self.compressor.add_into(p, message, -1.0)
        return self._mean_of(message, g.numel())


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

    def sync(self, name: str, weights: Tensor, master: Tensor | None, *, step: int, owner: int) -> Tensor:
        """Update this rank's working copy `weights` (contiguous, any shape) in place; returns it.

        master: the owner's x⁺ (same shape, any float dtype); None on other ranks.
        Dense (w ← x⁺ exactly) during warm-up and when the compressor keeps everything.
        """
        flat = weights.view(-1)
        d = flat.numel()
        is_owner = self.comm.rank == owner
        if is_owner and master is None:
            raise ValueError(f"rank {owner} owns {name!r} and must pass its master weights")
        if step < self.warmup_steps or self.compressor.keeps_all(d):
            if is_owner:
                flat.copy_(master.reshape(-1))
            broadcast_message(self.comm, Message(flat), d, owner=owner, counter=self.counter)
            return weights
        tensor_id = f"{name}/downlink"  # masks independent of the uplink's for the same tensor
        if is_owner:
            shift = (master.reshape(-1) - flat).to(flat.dtype)
            message = self.compressor.compress(shift, step=step, tensor_id=tensor_id, rank=owner)
        else:
            message = self.compressor.empty_message(
                d, flat.dtype, flat.device, step=step, tensor_id=tensor_id, rank=owner
            )
        broadcast_message(self.comm, message, d, owner=owner, counter=self.counter)
        self.compressor.add_into(flat, message)
        return weights

"""Gradient estimators over compressed communication (docs/compression.md#formulas).

An estimator turns each rank's local gradient of one tensor into the aggregate that a rank
steps with, bit-identical on every rank that computes it. A step runs in three phases over
all its tensors at once: `prepare` compresses each rank's tensor (and updates this rank's own
state), one bucketed exchange averages the messages (`transport.mean_many`: two collectives
at most), and `finish` turns each mean into the aggregate (updating the state every rank
shares). `aggregate_many` runs the three.

State is kept per tensor, keyed by name, as flat (d,) tensors in the gradient's dtype, plus
"step", the last step the tensor was aggregated at (0-d int64; its absence marks a tensor not yet
seen, whose next round is dense). Fields ending in `_bar` or `_hat` are the shared part: the same
on every rank that finishes the tensor (every rank, or only its owner when `aggregate_many` is
given owners); the others are this rank's own. A checkpoint stores `state_dict()` per rank
(after a change of world size, drop it: the next call re-initialises densely).

Owners' own shares: with `owners`, a rank's message for a tensor it owns goes to itself and
never crosses the wire, so (with `exact_own`, the default) the owner uses that share whole: its
aggregate is what it would be had the owner sent its own message uncompressed, and its own state
records the whole share (EF21's u = v, EF14's e = 0). On M ranks that leaves (M−1)/M of the
aggregate compressed, at no cost in bytes. exact_own=False compresses it like every other
rank's, which is the published estimators exactly (and what `owners=None` gives everywhere).

Dense rounds: the first call for a tensor (except EF14's: its residual starts at zero), every
step below `warmup_steps`, and every call whose compressor keeps all d coordinates send the
estimator's dense message, after which the
reference state equals what the identity compressor would leave (h = g for DIANA, u = v for
EF21, e = 0 for EF14). So ratio 1.0 reproduces `Dense` bit for bit.

Valid (estimator, compressor) pairs, enforced by `check_pair`:
- Dense: identity only (it sends everything anyway);
- Diana, Marina: unbiased compressors (identity, scaled randk): their variance reduction
  relies on E[Q(x)] = x, and a biased Top-k would bias the shifts for good;
- EF21Momentum, EF14: contractive compressors (identity, topk, randk_unscaled): error
  feedback needs ‖C(x) − x‖ < ‖x‖, which scaled Rand-k violates (its error is ω‖x‖² ≥ ‖x‖²
  once k ≤ d/2);
- Plain: anything, but the config layer only allows it when asked for (see `validate`).
Compress gradients or momentum, never Muon's orthogonalised update (docs/method.md#muon).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from distlip.compress.accounting import ByteCounter
from distlip.compress.compressors import Compressor, Identity, Message
from distlip.compress.transport import Comm, SingleProcessComm, mean_many
from distlip.errors import ConfigError
from distlip.seeds import stream_seed

State = dict[str, Tensor]


class Estimator:
    """Base class. Subclasses implement `_to_send` (the vector x this rank would send whole,
    compressed to its message), `_sent` (this rank's own state, given what went out) and
    `_finish` (the aggregate from the mean message, and the shared state), on flat (d,) tensors.

    compressor: what each rank sends (default Identity); comm: the collectives (default one
    process); warmup_steps: steps below this are dense; seed: for shared random choices
    other than masks (MARINA's coin); counter: where bytes are recorded (default a new one);
    exact_own: owners use their own share of their tensors whole (module docstring).
    """

    name = ""
    requires = "any"  # "any", "unbiased", "contractive" or "identity"
    starts_dense = True  # a tensor's first call is a dense round (it initialises the reference state)

    def __init__(
        self,
        compressor: Compressor | None = None,
        comm: Comm | None = None,
        *,
        warmup_steps: int = 0,
        seed: int = 0,
        counter: ByteCounter | None = None,
        exact_own: bool = True,
    ) -> None:
        self.compressor = compressor if compressor is not None else Identity()
        check_pair(self, self.compressor)
        self.comm = comm if comm is not None else SingleProcessComm()
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.counter = counter if counter is not None else ByteCounter()
        self.exact_own = exact_own
        self._state: dict[str, State] = {}
        self._previous: dict[str, Tensor] = {}
        self._own: set[str] = set()  # this call's tensors whose share this rank uses whole (exact_own owners)

    def aggregate_many(self, grads: dict[str, Tensor], *, step: int, owners: dict[str, int] | None = None,
                       previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The aggregate of every tensor in `grads` at optimiser `step`, shaped like its gradient.

        With `owners` ({name: rank}), each aggregate is computed on its owner only (reduce-scatter
        and all-to-all: fewer bytes) and the result holds this rank's tensors; without, every
        rank gets every aggregate. Every rank must pass the same names, in the same order, with
        the same owners, at the same steps. `previous`: this rank's gradients at the previous
        weights on this step's batch, for estimators that `needs_previous` (MARINA).
        """
        names = list(grads)
        dense = {n: self._is_dense(n, grads[n].numel(), step) for n in names}
        self._own = {n for n in names if self.exact_own and owners is not None and owners[n] == self.comm.rank}
        self._previous = previous or {}
        prepared = [self._prepare_one(n, grads[n].reshape(-1), step, dense[n], n in self._own and not dense[n])
                    for n in names]
        self._previous = {}
        messages = [message for message, _, _ in prepared]
        means = mean_many(self.comm, messages, [grads[n].numel() for n in names], self.counter,
                          None if owners is None else [owners[n] for n in names])
        for n, (message, exact, x) in zip(names, prepared):
            if x is not None:  # after the exchange: it completes the codes of a quantiser on shared scales
                self._sent(self._state[n], x, Message(x) if exact is not None else message)
        out = {}
        for n, (message, exact, _), mean in zip(names, prepared, means):
            if mean is None:
                continue
            if exact is not None:  # this rank's own share whole: mean + (x − C(x))/M
                mean.add_(exact, alpha=1.0 / self.comm.world_size)
                self.compressor.add_into(mean, message, -1.0 / self.comm.world_size)
            out[n] = self._finish(self._state[n], mean, dense[n]).view_as(grads[n])
        return out

    def needs_previous(self, sizes: dict[str, int], step: int) -> bool:
        """Whether `aggregate_many` at `step` for tensors of these sizes ({name: d}) needs `previous`."""
        return False

    def state_dict(self) -> dict[str, State]:
        """Per-tensor state keyed by name: {name: {field: (d,) tensor}} (references, not copies)."""
        return self._state

    def load_state_dict(self, state: dict[str, State]) -> None:
        self._state = {name: {key: t.clone() for key, t in fields.items()} for name, fields in state.items()}

    def _is_dense(self, name: str, d: int, step: int) -> bool:
        first = self.starts_dense and "step" not in self._state.get(name, {})
        return first or step < self.warmup_steps or self.compressor.keeps_all(d) or self._dense_round(name, step, d)

    def _prepare_one(self, name: str, g: Tensor, step: int, dense: bool,
                     whole: bool) -> tuple[Message, Tensor | None, Tensor | None]:
        """This rank's message for one tensor, the uncompressed x when `whole` (its own share of a
        tensor it owns, which its state then records as sent whole), and x for `_sent` (None in a
        dense round)."""
        state = self._state.setdefault(name, {})
        if dense:
            message, exact, x = Message(self._prepare_dense(state, g, name)), None, None
        else:
            x = self._to_send(state, g, name, step)
            message = self._compress(x, name, step)
            exact = x if whole else None
        state["step"] = torch.tensor(step)
        return message, exact, x

    def _dense_round(self, name: str, step: int, d: int) -> bool:
        """Whether this step is an extra dense round (MARINA's coin); decided identically on all ranks."""
        return False

    def _prepare_dense(self, state: State, g: Tensor, name: str) -> Tensor:
        """What this rank sends whole in a dense round (may alias `g`)."""
        return g

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        """The vector x this rank compresses in a compressed round (it may update own state that
        does not depend on what is sent, as one-pass MARINA's g_prev)."""
        raise NotImplementedError

    def _sent(self, state: State, x: Tensor, sent: Message) -> None:
        """Update this rank's own state after sending `sent` for x: its compressed message, or x
        whole (a dense Message) for an owner's own share. May consume x when `sent` is compressed."""

    def _finish(self, state: State, mean: Tensor, dense: bool) -> Tensor:
        """The aggregate, from the mean over ranks of the decompressed messages."""
        return mean

    def _compress(self, x: Tensor, name: str, step: int) -> Message:
        return self.compressor.compress(x, step=step, tensor_id=name, rank=self.comm.rank)


def _running_sum(state: State, key: str, mean: Tensor, dense: bool) -> Tensor:
    """state[key] ← mean after a dense round, state[key] + mean otherwise; returns it (a copy,
    so the caller may keep it while the state moves on). MARINA's ĝ and EF21's ū both work so."""
    if dense:
        state[key] = mean.clone()
        return mean
    state[key].add_(mean)
    return state[key].clone()


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
    """Plain mean of the gradients: the oracle every estimator is compared with."""

    name = "dense"
    requires = "identity"


class Plain(Estimator):
    """Mean of Q(g_m) with no variance reduction or error feedback.

    With scaled Rand-k its variance is ω = d/k − 1 times the gradient's: at 1% it diverges at
    ordinary learning rates (docs/compression.md#formulas). Kept for comparisons; `validate` refuses it unless asked.
    """

    name = "plain"

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        return g


class Diana(Estimator):
    """DIANA: compress the difference to a learned shift, Δ_m = Q(g_m − h_m).

    ĝ = h̄ + mean Δ; h_m += αΔ_m; h̄ += α·mean Δ with α = 1/(ω+1). The shifts learn each
    rank's gradient, so the compressed part, and its variance, shrinks as training settles.
    State: h (this rank's shift), h_bar (the mean shift).
    """

    name = "diana"
    requires = "unbiased"

    def _alpha(self, d: int) -> float:
        return 1.0 / (self.compressor.omega(d) + 1.0)

    def _prepare_dense(self, state: State, g: Tensor, name: str) -> Tensor:
        state["h"] = g.clone()
        return g

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        return g - state["h"]

    def _sent(self, state: State, x: Tensor, sent: Message) -> None:
        self.compressor.add_into(state["h"], sent, self._alpha(x.numel()))

    def _finish(self, state: State, mean: Tensor, dense: bool) -> Tensor:
        if dense:
            state["h_bar"] = mean.clone()
            return mean
        out = state["h_bar"] + mean
        state["h_bar"].add_(mean, alpha=self._alpha(mean.numel()))
        return out


class Marina(Estimator):
    """MARINA: with probability p a dense round, else ĝ ← ĝ + mean Q(g_m(x⁺) − g_m(x)).

    same_batch=True (the method as published): both gradients are on this step's minibatch,
    the second taken at the previous weights (a second backward pass; the caller passes it as
    `previous`). The difference then shrinks with the step, and so does the Rand-k noise that
    ĝ accumulates between dense rounds. same_batch=False: one pass; g_m(x) is this rank's
    previous local gradient, on the previous minibatch, so every difference also carries
    minibatch noise, which ω = d/k − 1 amplifies and ĝ accumulates: it drifts.
    The coin is drawn per tensor from (seed, step, name), the same on every rank, which
    spreads the dense rounds of different tensors over different steps. p defaults to k/d.
    State: g_prev (this rank's last gradient; one-pass only), g_hat (the estimate).
    """

    name = "marina"
    requires = "unbiased"

    def __init__(self, compressor: Compressor | None = None, comm: Comm | None = None, *, p: float | None = None,
                 same_batch: bool = True, **kw):
        super().__init__(compressor, comm, **kw)
        if p is not None and not 0.0 < p <= 1.0:
            raise ConfigError(f"marina_p must be in (0, 1], got {p!r}: leave it unset for k/d")
        self.p = p
        self.same_batch = same_batch

    def needs_previous(self, sizes: dict[str, int], step: int) -> bool:
        return self.same_batch and not all(self._is_dense(n, d, step) for n, d in sizes.items())

    def _dense_round(self, name: str, step: int, d: int) -> bool:
        p = self.p if self.p is not None else self.compressor.k(d) / d
        return random.Random(stream_seed(self.seed, step, name, "marina")).random() < p

    def _prepare_dense(self, state: State, g: Tensor, name: str) -> Tensor:
        if not self.same_batch:
            state["g_prev"] = g.clone()
        return g

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        if self.same_batch:
            before = self._previous.get(name)
            if before is None:
                raise ValueError(f"MARINA needs {name!r}'s gradient at the previous weights on this batch "
                                 "(aggregate_many(previous=...)), or same_batch=False")
            return g - before.reshape(-1).to(g.dtype)
        x = g - state["g_prev"]
        state["g_prev"].copy_(g)
        return x

    def _finish(self, state: State, mean: Tensor, dense: bool) -> Tensor:
        return _running_sum(state, "g_hat", mean, dense)


class EF21Momentum(Estimator):
    """EF21 with momentum: v_m ← (1−η)v_m + η·g_m; c_m = C(v_m − u_m); u_m += c_m; ū += mean c_m.

    Returns ū. With η = 1 (default) v is the gradient itself and this is plain EF21; the
    optimiser's own momentum then applies to ū. With η < 1 ū is already an EMA momentum
    (β = 1 − η): compress momentum, and do not apply momentum to ū again. v starts at the
    first gradient. State: v (η < 1 only), u (this rank's), u_bar (the mean of the u_m).

    eta_sent (default η): the η of the shares that go out compressed, every share but an
    exact_own owner's own. u_m follows v_m with an error of about ‖Δv_m‖(1−δ)/δ for a
    compressor keeping a share δ of the energy, and ‖Δv_m‖ scales with η: a slower momentum
    is tracked far better, at the cost of lag, which the owner's own share (fresh at η) offsets.
    """

    name = "ef21"
    requires = "contractive"

    def __init__(self, compressor: Compressor | None = None, comm: Comm | None = None, *, eta: float = 1.0,
                 eta_sent: float | None = None, **kw):
        super().__init__(compressor, comm, **kw)
        eta_sent = eta if eta_sent is None else eta_sent
        for key, value, fix in (("ef21_eta", eta, "use 1.0 for plain EF21"),
                                ("ef21_eta_sent", eta_sent, "e.g. 0.01, or leave it unset for ef21_eta")):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{key} must be in (0, 1], got {value!r}: {fix}")
        if eta == 1.0 and eta_sent != 1.0:
            raise ConfigError(f"ef21_eta_sent={eta_sent} needs ef21_eta < 1: at ef21_eta = 1 Muon's momentum "
                              "smooths the aggregate again; set ef21_eta (e.g. 0.1) or drop ef21_eta_sent")
        self.eta, self.eta_sent = eta, eta_sent

    def _momentum(self, state: State, g: Tensor, name: str) -> Tensor:
        eta = self.eta if name in self._own else self.eta_sent
        if eta == 1.0:
            return g
        v = state.get("v")
        if v is None:
            state["v"] = v = g.clone()
        else:
            v.lerp_(g, eta)
        return v

    def _prepare_dense(self, state: State, g: Tensor, name: str) -> Tensor:
        v = self._momentum(state, g, name)
        state["u"] = v.clone()
        return v

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        return self._momentum(state, g, name) - state["u"]

    def _sent(self, state: State, x: Tensor, sent: Message) -> None:
        self.compressor.add_into(state["u"], sent)

    def _finish(self, state: State, mean: Tensor, dense: bool) -> Tensor:
        return _running_sum(state, "u_bar", mean, dense)


class EF14(Estimator):
    """Classic error feedback: p = g + e; c = C(p); e ← p − c; aggregate = mean of c.

    State: e (this rank's residual; absent means zero: at the start, and after a dense round, so the
    first call is compressed unless `warmup_steps` says otherwise).
    """

    name = "ef14"
    requires = "contractive"
    starts_dense = False  # the residual starts at zero: there is no reference state to initialise

    def _prepare_dense(self, state: State, g: Tensor, name: str) -> Tensor:
        e = state.pop("e", None)
        return g if e is None else g + e

    def _to_send(self, state: State, g: Tensor, name: str, step: int) -> Tensor:
        e = state.get("e")
        return g.clone() if e is None else g + e

    def _sent(self, state: State, x: Tensor, sent: Message) -> None:
        if sent.whole:  # x went whole: nothing left over
            state.pop("e", None)
        else:
            state["e"] = self.compressor.add_into(x, sent, -1.0)

"""The distributed engine: one rank's forward, backward and step.

Who updates what:
- distlip owns every matrix (and the embedding when it takes the column-normalised step):
  each tensor has one owner rank (`sharding.plan_ownership`). Gradients are reduced to the
  owner, the owner runs momentum → Newton–Schulz → update → constraint, then broadcasts the
  new weights. No rank repeats another's work and replicas are identical by construction.
- DeepSpeed owns the embedding when it takes Adam: `deepspeed.initialize` wraps the embedding
  module with ZeRO stage 0–3, which partitions its Adam state (and, at stage 3, the weight).
  After its step the row-RMS cap is applied to the full fp32 master and written back to the
  copy the next forward reads (`safe_set_full_fp32_param` alone does not do that).

With one process there is no communication and no DeepSpeed: the same code, all tensors owned.

How the tensors distlip steps travel is the `exchange` (`distlip.distributed.exchange`): the
dense owner-computes reduce and broadcast (`DenseExchange`), or, with the `compression:` block
on (world size > 1), `CompressedExchange`: compressed gradients aggregated by an estimator on
every rank, and optionally an EF21-P compressed downlink, after which the owner's master x
(what is constrained, certified and saved: `master_weights()`) differs from the module
weights w the forward reads. The DeepSpeed-held embedding's gradients stay dense (DeepSpeed
reduces them itself). With `compression.sync_every` > 1 it is the local-step outer loop
(`distlip.distributed.outer.OuterLoop`): every rank steps every tensor on its own gradient
(`stepped`, beyond what it owns) and the ranks exchange pseudo-gradients every H steps; between
exchanges the ranks' weights differ, so norms are the largest over ranks, not sums. Under
`compressor: lowrank` every rank gets every aggregate (all-reduced factors), so every rank steps
and constrains every tensor (`stepped`) and nothing is broadcast back.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from distlip.compress import TorchComm
from distlip.config.schema import Config, OptimConfig
from distlip.data.packing import document_ids
from distlip.distributed.deepspeed import deepspeed_config, gather_adam, scatter_adam, uses_deepspeed
from distlip.distributed.env import DistEnv
from distlip.distributed.exchange import CompressedExchange, DenseExchange, Exchange
from distlip.distributed.outer import OuterLoop
from distlip.distributed.replicas import agree_or_broadcast
from distlip.distributed.sharding import plan_ownership
from distlip.lipschitz.caps import CAPPED_METHODS, cap_of, row_blocks
from distlip.lipschitz.certificate import embed_rms_max
from distlip.lipschitz.constrainer import Constrainer
from distlip.lipschitz.constraints import embed_cap
from distlip.metrics import StepTimer
from distlip.model import LipschitzTransformer, head_blocks, matrix_names, matrix_of
from distlip.optim import Optimizers, StepInfo

EMBED = "embed.weight"


class Engine:
    """One rank's share of training: forward, backward, and the step
    (communicate → optimise → constrain → share, `step`)."""

    def __init__(self, cfg: Config, model: LipschitzTransformer, env: DistEnv, timer: StepTimer,
                 sigma_max: dict[str, float], document_eot: int | None = None):
        """document_eot: with it, attention stays inside the documents that this token starts."""
        self.cfg, self.model, self.env, self.timer = cfg, model, env, timer
        self.document_eot = document_eot
        self.params = dict(model.named_parameters())
        self.device = next(model.parameters()).device
        self._agree_initial()
        self.ds = self._deepspeed() if uses_deepspeed(cfg, env) else None
        ours = matrix_names(model) + ([] if self.ds else [EMBED])
        self.plan = plan_ownership({n: self.params[n].numel() for n in ours}, env.world_size)
        # What this rank writes to checkpoints and certifies (its share of the plan).
        self.owned = self.plan.owned_by(env.rank)
        c, mats = cfg.constraint, matrix_names(model)
        caps = {n: sigma_max[n] for n in mats}
        self.embed_max_rms = cap_of(EMBED, c)
        # Caps on the outer loop's round-start weights: the same map on every rank, no decay (the local
        # steps decay); methods without caps leave them as the outer step puts them.
        self.global_constrainer = (Constrainer(c.method, caps, power_iters=c.power_iters, seed=cfg.train.seed,
                                               row_blocks=row_blocks(cfg, mats))
                                   if cfg.compression.sync_every > 1 and c.method in CAPPED_METHODS else None)
        self.exchange: Exchange = self._exchange()
        # What this rank steps and constrains: what it owns, or every tensor between the outer loop's exchanges.
        self.local_steps = isinstance(self.exchange, OuterLoop)
        # lowrank gives every rank every aggregate: every rank steps every tensor alike, nothing is sent back
        replicated = isinstance(self.exchange, CompressedExchange) and self.exchange.replicated
        self.stepped = list(self.plan.owner) if self.local_steps or replicated else self.owned
        # The second backward pass (MARINA on one batch): whether one is running, and its gradients
        # until `step` takes them.
        self._in_previous_pass = False
        self._pending_previous: dict[str, torch.Tensor] | None = None
        # The master x under a compressed downlink, else the weight itself.
        self.held = {n: self.exchange.masters.get(n, self.params[n]) for n in self.stepped}
        per_head_muon = cfg.optim.per_head and cfg.optim.name == "muon"
        self.optim = Optimizers(self.held, self._optim_config(), n_layers=cfg.model.n_layers,
                                row_blocks={n: head_blocks(n, cfg.model.n_heads) for n in self.held}
                                if per_head_muon else None)
        self.constrainer = Constrainer(c.method, caps, weight_decay=c.weight_decay, spectral_wd=c.spectral_wd,
                                       power_iters=c.power_iters, seed=cfg.train.seed, row_blocks=row_blocks(cfg, mats),
                                       blockwise_updates=per_head_muon)

    def _exchange(self) -> Exchange:
        """The communication strategy the `compression:` block names (`distlip.distributed.exchange`)."""
        section, rank = self.cfg.compression, self.env.rank
        if section.sync_every > 1:  # on ≥ 2 processes (preflight)
            return OuterLoop(section, self.params, list(self.plan.owner), self.owned, total=self.cfg.train.steps,
                             constrain=self._constrain_global, comm=TorchComm())
        if section.enabled:
            return CompressedExchange(section, self.params, self.plan, rank)
        return DenseExchange(self.params, self.plan, rank)

    def _optim_config(self) -> OptimConfig:
        """EF21 with ef21_eta < 1 aggregates momentum v ← (1−η)v + ηg itself (β = 1 − η); stepping
        Muon's own momentum on top would smooth twice, so the owner's Muon then runs with β = 0."""
        if not self.exchange.carries_momentum:
            return self.cfg.optim
        return replace(self.cfg.optim, momentum=0.0, momentum_start=0.0, momentum_warmup=0)

    @torch.no_grad()
    def _agree_initial(self) -> None:
        """Every replica starts from rank 0's weights (`replicas.agree_or_broadcast`)."""
        if self.env.world_size > 1:
            agree_or_broadcast([p.data for p in self.model.parameters()])

    def _deepspeed(self):
        import deepspeed
        engine, _, _, _ = deepspeed.initialize(model=self.model.embed, model_parameters=self.model.embed.parameters(),
                                               config=deepspeed_config(self.cfg, self.env.world_size))
        return engine

    # ---- forward / backward -------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) → logits (B, T, vocab_size)."""
        return self.model.head_logits(self.hidden(idx))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) → final residual stream (B, T, d), the head's input."""
        if self.ds is None:
            h = self.model.embed(idx)
        elif self._in_previous_pass:  # DeepSpeed's embedding takes no part
            with torch.no_grad():
                h = self.ds(idx).detach()
        else:
            h = self.ds(idx)
        mask = None if self.document_eot is None else self.model.document_mask(document_ids(idx, self.document_eot))
        return self.model.hidden(h, mask)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """Accumulate one micro-batch's gradients (mean over the step's micro-batches)."""
        if self.ds is None or self._in_previous_pass:
            (loss / self.cfg.train.grad_accum).backward()
            return
        self.ds.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
        if not last_micro:
            self.ds.step()  # DeepSpeed counts micro-steps; it only updates at the boundary

    def needs_previous_gradients(self, step: int) -> bool:
        """Whether `step` needs a second backward pass of its batch `at_previous_weights` (MARINA)."""
        return self.exchange.needs_previous(step)

    @contextlib.contextmanager
    def at_previous_weights(self):
        """Inside: the module holds the working copies of before the last step, and `forward` /
        `backward` fill fresh gradients of distlip's tensors there (DeepSpeed's embedding is held
        fixed and gets none). On exit the current weights and gradients are back, and the second
        pass's gradients wait for `step`."""
        saved = {n: (self.params[n].data, self.params[n].grad) for n in self.plan.owner}
        self._in_previous_pass = True
        try:
            for n in saved:
                self.params[n].data = self.exchange.previous[n]  # swapped, not copied: restored below
                self.params[n].grad = None
            yield
            self._pending_previous = {n: self._grad(n) for n in saved}
        finally:
            self._in_previous_pass = False
            for n, (data, grad) in saved.items():
                self.params[n].data, self.params[n].grad = data, grad

    # ---- the step -------------------------------------------------------------------------
    def step(self, step: int, total: int) -> StepInfo:
        """The step after the backward pass: communicate (the aggregate gradient of every tensor
        this rank steps) → optimise → constrain → share (every rank's weights brought up to
        date). The trainer certifies the result."""
        with self.timer.phase("comm"):
            previous, self._pending_previous = self._pending_previous, None
            grads = self.exchange.gradients(self._grad, step, previous)
        with self.timer.phase("optimizer"):
            info = self.optim.step(step, total, grads)
            self._step_deepspeed(info)
            self.model.zero_grad(set_to_none=True)
        with self.timer.phase("constraint"):
            self._constrain_stepped(info)
            self._cap_deepspeed_embedding()
        with self.timer.phase("comm"):
            self.exchange.share(step)
        return info

    def _grad(self, name: str) -> torch.Tensor:
        """This rank's local fp32 gradient of `name` (zeros when it took no part in the loss)."""
        g = self.params[name].grad
        return torch.zeros_like(self.params[name]) if g is None else g.float()

    @torch.no_grad()
    def _constrain_stepped(self, info: StepInfo) -> None:
        margin = self.cfg.constraint.margin
        mats = [n for n in self.stepped if n != EMBED]
        norms = {n: (None if info.update_norms.get(n) is None else info.update_norms[n] * margin) for n in mats}
        if mats:
            new = self.constrainer.apply_many({n: self.held[n].data for n in mats}, lr=info.lr, update_norms=norms)
            for n, w in new.items():
                self.held[n].data.copy_(w)
        if EMBED in self.stepped and self.cfg.constraint.embed_cap:
            e = self.held[EMBED]
            e.data.copy_(embed_cap(e.data, self.embed_max_rms))

    @torch.no_grad()
    def _constrain_global(self, weights: dict[str, torch.Tensor]) -> None:
        """Caps on the outer loop's new round-start weights {name: tensor}, in place: the run's
        method with no update bound (its outer step has none) and no decay."""
        mats = {n: w for n, w in weights.items() if n != EMBED}
        if self.global_constrainer is not None:
            for n, w in self.global_constrainer.apply_many(mats, lr=0.0).items():
                weights[n].copy_(w)
        if EMBED in weights and self.cfg.constraint.embed_cap:
            weights[EMBED].copy_(embed_cap(weights[EMBED], self.embed_max_rms))

    # ---- the DeepSpeed-held embedding ------------------------------------------------------
    def _step_deepspeed(self, info: StepInfo) -> None:
        """DeepSpeed's Adam step of the embedding, at this step's learning rate."""
        if self.ds is None:
            return
        for group in self.ds.optimizer.param_groups:
            group["lr"] = info.lr * self.cfg.optim.lr_mult.get("embed", 1.0)
        self.ds.step()

    def embedding(self) -> torch.Tensor:
        """The full fp32 embedding (vocab, d) on every rank (a collective under ZeRO ≥ 1)."""
        if self.ds is None or self.cfg.dist.zero_stage == 0:
            return self.params[EMBED].data
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(self.params[EMBED])

    @torch.no_grad()
    def _cap_deepspeed_embedding(self) -> None:
        if self.ds is None or not self.cfg.constraint.embed_cap:
            return
        self.set_embedding(embed_cap(self.embedding(), self.embed_max_rms))

    @torch.no_grad()
    def set_embedding(self, full: torch.Tensor) -> None:
        """Write the full fp32 embedding (vocab, d) on every rank: the weights the next forward
        reads and, under ZeRO ≥ 1, DeepSpeed's fp32 master the next update starts from."""
        p = self.params[EMBED]
        if self.ds is None or self.cfg.dist.zero_stage == 0:
            p.data.copy_(full)
            return
        from deepspeed.utils import safe_set_full_fp32_param
        safe_set_full_fp32_param(p, full)  # the fp32 master alone: the forward copy is separate
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's shard of the forward weights
            shard = p.ds_tensor
            flat = full.reshape(-1)[self.env.rank * shard.numel():(self.env.rank + 1) * shard.numel()]
            shard.data.zero_()
            shard.data[:flat.numel()].copy_(flat)
        if p.data.numel() == full.numel():  # ZeRO-1/2, or a ZeRO-3 parameter kept whole
            p.data.copy_(full)

    def embed_rms_max(self) -> float:
        """Largest token-vector RMS of the certified embedding (its owner's master under a
        compressed downlink, found without sending the embedding; a collective when world > 1)."""
        if EMBED not in self.plan.owner:  # DeepSpeed's
            return embed_rms_max(self.embedding())
        if self.local_steps:  # every rank's own embedding
            return self.all_max([embed_rms_max(self.held[EMBED].data)])[0]
        mine = embed_rms_max(self.held[EMBED].data) if EMBED in self.owned else 0.0
        return self.all_sum([mine])[0]

    @torch.no_grad()
    def master_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter's certified value by name, full and identical on every rank (a
        collective): what to certify exactly and save. Under a compressed downlink each owner
        broadcasts its masters x; otherwise these are the module weights themselves."""
        weights = {n: p.data for n, p in self.params.items()}
        weights[EMBED] = self.embedding()
        return self.exchange.master_weights(weights)

    @contextlib.contextmanager
    def at_master_weights(self):
        """Inside: the module holds `master_weights()` (the outer loop's round-start weights
        between its exchanges, the same on every rank), for an evaluation; restored on exit.
        Elsewhere the module weights already are what is evaluated, and nothing changes."""
        if not self.local_steps:
            yield
            return
        masters = self.master_weights()
        saved = {n: self.params[n].data for n in self.stepped}
        try:
            for n in saved:
                self.params[n].data = masters[n]  # swapped, not copied: restored below
            yield
        finally:
            for n, data in saved.items():
                self.params[n].data = data

    def log_fields(self) -> dict:
        """Per-step fields the engine adds to each metrics record: with compression on, bytes per
        rank per step (uplink, downlink, dense equivalent, ratio, totals) and codec time
        (`CompressedExchange.log_fields`)."""
        return self.exchange.log_fields()

    def compression_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's compression state by tensor name (estimator fields; "master" on the owner
        under a compressed downlink); empty with compression off. See `CompressedExchange.state_dict`."""
        return self.exchange.state_dict()

    def load_compression_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.exchange.load_state_dict(state)

    @property
    def keeps_masters(self) -> bool:
        """Whether the owners' masters x are kept apart from the module weights w (a compressed downlink)."""
        return bool(self.exchange.masters)

    def state_dict(self) -> dict:
        """This rank's state by tensor name: `weights` and `momentum`/`adam` of the tensors it owns
        (the DeepSpeed-held embedding gathered, on every rank, and kept by rank 0), the constrainer's
        power-iteration vectors (`constraint`) and the compression state. With local steps also
        `local`: this rank's own optimiser and constrainer state of every tensor it steps
        (`momentum`, `constraint`, `global_constraint`), which resumes on the same world size
        only. Collective under DeepSpeed."""
        owned = set(self.owned)
        optim = self.optim.state_dict()
        weights = {n: self.params[n].data for n in self.owned}
        adam = {n: s for n, s in optim.get("adam", {}).items() if s}  # empty before the first step
        if self.ds is not None:  # gathered on every rank (collectives), written by rank 0
            embed, embed_adam = self.embedding(), gather_adam(self.ds, self.params[EMBED])
            if self.env.rank == 0:
                weights[EMBED] = embed
                if embed_adam is not None:
                    adam[EMBED] = embed_adam
        vectors = self.constrainer.state_dict()
        state = {"weights": weights, "momentum": {n: m for n, m in optim["momentum"].items() if n in owned},
                 "adam": adam, "constraint": {n: v for n, v in vectors.items() if matrix_of(n) in owned},
                 "compression": self.compression_state_dict()}
        if self.local_steps:
            state["local"] = {"momentum": optim["momentum"], "constraint": vectors,
                              "global_constraint": self.global_constrainer.state_dict()
                              if self.global_constrainer is not None else {}}
        return state

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Every full weight by name into this rank's module (and DeepSpeed's embedding master)."""
        for name in matrix_names(self.model):
            self.params[name].data.copy_(weights[name])  # .data: outside autograd
        self.set_embedding(weights[EMBED].to(self.device))

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state` merged by name (every weight; the optimiser and constrainer state of
        at least the tensors this rank owns; `compression` None when there is none to load)."""
        self.load_weights(state["weights"])
        adam, stepped = state["adam"], set(self.stepped)
        self.optim.load_state_dict({"momentum": state["momentum"], "adam": adam})
        if self.ds is not None and EMBED in adam:
            scatter_adam(self.ds, self.params[EMBED], adam[EMBED])
        self.constrainer.load_state_dict({n: v for n, v in state["constraint"].items() if matrix_of(n) in stepped})
        if state["compression"] is not None:
            self.load_compression_state_dict(state["compression"])
        if self.local_steps and (local := state.get("local")) is not None:
            self.optim.load_state_dict({"momentum": local["momentum"]})
            self.constrainer.load_state_dict(local["constraint"])
            if self.global_constrainer is not None:
                self.global_constrainer.load_state_dict(local["global_constraint"])

    # ---- sums over ranks --------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        if self.env.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, values: list[float]) -> list[float]:
        if self.env.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def owned_norms(self, norm_fn, keys: list[str] | None = None) -> dict[str, float]:
        """RMS→RMS norms of every matrix, each computed by its owner only, then summed. With
        local steps every rank measures its own weights and each norm is the largest over ranks:
        the certificate (increasing in every norm) then bounds every rank's model at once.
        `keys`: every key `norm_fn` returns over all matrices (head blocks included); default the names."""
        names = matrix_names(self.model)
        keys = keys or names
        if self.local_steps:
            mine = norm_fn({n: self.held[n].data for n in names})
            return dict(zip(keys, self.all_max([mine[k] for k in keys])))
        mine = norm_fn({n: self.held[n].data for n in names if n in self.owned})
        return dict(zip(keys, self.all_sum([mine.get(k, 0.0) for k in keys])))

"""The training loop: config → data → model → step (backward → optimise → constrain → certify)
→ log / evaluate / save.

Each step ends with every matrix projected under its cap, so the certificate computed from the
weights holds after every step, not just at the end.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from distlip.checkpoint.average import average_checkpoints, averaged_steps
from distlip.checkpoint.export import save_model
from distlip.checkpoint.files import Checkpoint
from distlip.checkpoint.state import load_checkpoint, save_checkpoint
from distlip.checkpoint.store import CheckpointStore
from distlip.config import Config
from distlip.config.checks import check_output_dir
from distlip.data.in_memory import InMemoryBatches, load_char_corpus, val_windows
from distlip.distributed.engine import Engine
from distlip.distributed.env import DistEnv, init_distributed, select_device
from distlip.distributed.wire import WireCounter
from distlip.divergence import DivergenceGuard
from distlip.errors import ConfigError, DistlipError
from distlip.evaluation import evaluate
from distlip.lipschitz.budget import apply_target
from distlip.lipschitz.caps import CAPPED_METHODS, EMBED, cap_of, constraint_summary, matrix_caps, row_blocks, unit_caps
from distlip.lipschitz.certificate import Certificate, SigmaEstimator, certify, certify_weights, exact_norms, norm_keys
from distlip.lipschitz.constrainer import Constrainer
from distlip.lipschitz.constraints import embed_cap
from distlip.loss import chunk_tokens, head_cross_entropy, head_loss_and_correct
from distlip.memory import check_memory, micro_batch_size
from distlip.metrics import MetricsLogger, Progress, StepTimer
from distlip.model import LipschitzTransformer, matrix_names, matrix_of
from distlip.paper_protocol import BATCH_SIZE, batch_scores, describe, protocol_windows
from distlip.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, exit_for_requeue
from distlip.preflight import check_lowrank_shapes, preflight
from distlip.teacher import open_teacher, soft_targets


@dataclass
class Data:
    """What the trainer needs from the data layer."""

    tokenizer: object
    train: object  # next_batch() -> (x, y) int64 (B, T)[, teacher's (B, T, V)]; state_dict / load_state_dict
    val_x: torch.Tensor  # (n, T) int64
    val_y: torch.Tensor
    val_ids: object = None  # the validation tokens in order (1-D int array), for the paper's protocol


def build_data(cfg: Config, env: DistEnv) -> Data:
    """In-memory char data for the packaged Shakespeare / a local text file; the streaming
    pipeline (sharded by rank, packed, resumable) for everything else."""
    d, t, T = cfg.data, cfg.train, cfg.seq_len()
    micro = micro_batch_size(cfg, env.world_size)
    if d.in_memory:
        tok, train_ids, val_ids = load_char_corpus(d.source, d.path, d.val_fraction)
        vx, vy = val_windows(val_ids, T)
        soft = None
        if t.teacher:
            predict, teacher_len = open_teacher(t.teacher, tok)
            if env.rank == 0 and t.progress:
                print(f"distlip: {t.teacher} predicts the {len(train_ids):,} training tokens "
                      f"(windows of {teacher_len}) …", flush=True)
            soft = soft_targets(predict, train_ids, teacher_len, tok.vocab_size)
        train = InMemoryBatches(train_ids, T, micro, t.seed, env.rank, env.world_size, t.grad_accum, soft)
        return Data(tok, train, vx, vy, val_ids)
    from distlip.data.stream import StreamingBatches, load_stream_tokenizer

    if d.val_tokens <= 0:
        raise ConfigError(f"data.source={d.source} streams its data: set data.val_tokens (e.g. 1000000) to hold "
                          "out the start of the stream for validation")
    tok = load_stream_tokenizer(d)
    train = StreamingBatches(d, tok, T, micro, env.rank, env.world_size, seed=t.seed)
    vx, vy = val_windows(train.held_out.tokens, T)
    return Data(tok, train, vx, vy, train.held_out.tokens)


class Trainer:
    """Training of the Lipschitz transformer on one process or many (torchrun / accelerate)."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, env: DistEnv | None = None):
        self.cfg = cfg
        self.env = env = env or DistEnv.from_environ()
        self.out = Path(out_dir or cfg.train.out)
        preflight(cfg, env)
        self.device = select_device(cfg, env.local_rank)
        if cfg.train.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        self.data = build_data(cfg, env)
        if cfg.model.vocab_size == 0:
            self.cfg = cfg = replace(cfg, model=replace(cfg.model, vocab_size=self.data.tokenizer.vocab_size))
        elif cfg.model.vocab_size < self.data.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{self.data.tokenizer.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
        self.cfg = cfg = apply_target(cfg)  # caps for a target bound, now that the vocabulary is known
        check_lowrank_shapes(cfg)  # the embedding and head too, now that their rows are known
        check_memory(cfg, env.world_size, self.device)
        check_output_dir(self.out)  # last of the refusals: it creates the run directory
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.wire = WireCounter().install() if env.world_size > 1 else WireCounter()
        init_distributed(env, self.device, cfg.dist.timeout)
        torch.manual_seed(cfg.train.seed)
        self.model = LipschitzTransformer(cfg.model).to(self.device)
        self.model.set_fast_path(cfg.train.attention, cfg.train.compile)
        self.params = dict(self.model.named_parameters())
        self.matrices = matrix_names(self.model)
        self.caps = unit_caps(cfg, self.matrices)
        self._project_initial()
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.train.dtype == "bfloat16" else nullcontext())
        self.timer = StepTimer(self.device)
        self.engine = Engine(cfg, self.model, env, self.timer, self._sigma_max_map(), self._document_eot())
        if cfg.train.compile:
            self.engine.optim.compile()
        self.estimator = SigmaEstimator(seed=cfg.train.seed, n_heads=cfg.model.n_heads)
        self.step, self.lr = 0, 0.0
        self.store = CheckpointStore.for_process_group(self.out, cfg.train.keep_last)
        self.resumed = self._resume(cfg.train.resume)
        self.saved_step = self.step if self.resumed else None
        self.guard = DivergenceGuard(self.data.tokenizer.vocab_size, cfg.train.diverge_patience,
                                     cfg.train.diverge_grace, cfg.optim.lr, cfg.constraint.method)

    def _resume(self, resume: str) -> Checkpoint | None:
        """Restore from train.resume ("" fresh, "auto", a tag or a path); collective. The newest
        good checkpoint is found past torn or corrupt ones, with a warning naming each."""
        ckpt = self.store.resolve(resume)
        if ckpt is not None:
            if ckpt.step > self.cfg.train.steps:
                raise ConfigError(f"checkpoint {ckpt.path} is at step {ckpt.step}, past "
                                  f"train.steps={self.cfg.train.steps}; raise train.steps to continue training it")
            # ZeRO-3 may hold p.data empty
            shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
            state, note = load_checkpoint(ckpt, self.cfg, self.data.tokenizer, self.env, shapes,
                                          self.engine.keeps_masters)
            self.load_state_dict(state)
            self.step = ckpt.step
            if self.env.is_main:
                print(f"distlip: {note}", file=sys.stderr, flush=True)
        return ckpt

    def save(self) -> None:
        """Checkpoint the whole state at this step boundary (collective; at most once per step)."""
        if self.saved_step != self.step:
            meta = {"config": self.cfg.to_dict(), "tokenizer": self.data.tokenizer.to_dict()}
            with self.wire.category("checkpoint"):
                save_checkpoint(self.store, self.step, self.env.rank, self.state_dict(), meta)
            self.saved_step = self.step

    def state_dict(self) -> dict:
        """This rank's whole training state, composed from its components (the engine's tensors by
        name, the certificate estimator's vectors, the data stream, the RNG); collective under
        DeepSpeed. Checkpointing works on this dict and never on the trainer."""
        state = self.engine.state_dict()
        owned = set(self.engine.owned)
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        vectors = self.estimator.state_dict()["vectors"]
        if "local" in state:  # local steps: this rank estimates its own weights' norms
            state["local"]["sigma"] = vectors
        sigma = {n: v for n, v in vectors.items() if matrix_of(n) in owned}
        return {**state, "sigma": sigma, "data": self.data.train.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """Restore every component from `state` (as `checkpoint.state.load_checkpoint` merges it);
        `data` None leaves the stream at its beginning."""
        self.engine.load_state_dict(state)
        owned = set(self.engine.owned)
        vectors = {n: v.to(self.device) for n, v in state["sigma"].items() if matrix_of(n) in owned}
        if self.engine.local_steps and state.get("local") is not None:
            vectors = {n: v.to(self.device) for n, v in state["local"]["sigma"].items()}
        self.estimator.load_state_dict({"vectors": vectors})
        if state["data"] is not None:
            self.data.train.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _document_eot(self) -> int | None:
        if not self.cfg.data.document_mask:
            return None
        eot = self.data.tokenizer.eot_id
        if eot is None:
            raise ConfigError(f"data.document_mask=true needs documents separated by an end-of-text token, which "
                              f"data.source={self.cfg.data.source} with this tokenizer does not have; "
                              "set data.document_mask=false or stream jsonl/parquet/hub documents")
        return eot

    def _sigma_max_map(self) -> dict[str, float]:
        return matrix_caps(self.cfg.constraint, self.matrices)

    @torch.no_grad()
    def _project_initial(self) -> None:
        """Start feasible: exact-cap the initial matrices (orthogonal init has norm 1, and each head
        block of W_q/W_k/W_v norm √H, above caps below that) and the token vectors."""
        if self.cfg.constraint.method not in CAPPED_METHODS:
            return
        init = Constrainer("exact_cap", self._sigma_max_map(), row_blocks=row_blocks(self.cfg, self.matrices))
        named = {n: self.params[n].data for n in self.matrices}
        for n, w in init.apply_many(named, lr=0.0, update_norms={n: None for n in named}).items():
            self.params[n].data.copy_(w)
        if self.cfg.constraint.embed_cap:
            e = self.params[EMBED].data
            e.copy_(embed_cap(e, cap_of(EMBED, self.cfg.constraint)))

    # ---- one step -------------------------------------------------------------------------
    def forward_backward(self) -> float:
        """Accumulate gradients over micro-batches; returns the mean loss over all ranks. MARINA
        on one batch then runs the same micro-batches again at the previous weights."""
        accum, total, batches = self.cfg.train.grad_accum, 0.0, []
        for i in range(accum):
            with self.timer.phase("data"):
                batch = [b.to(self.device, non_blocking=True) for b in self.data.train.next_batch()]
            total += self._micro_step(*batch, last=i == accum - 1).item()
            batches.append(batch)
        if self.engine.needs_previous_gradients(self.step):
            with self.engine.at_previous_weights():
                for batch in batches:
                    self._micro_step(*batch, last=False)
        return self.engine.all_sum([total / accum])[0] / self.env.world_size

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None = None, *,
                    last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (with the teacher's distributions `soft`, if
        distilling); its loss."""
        m, t = self.cfg.model, self.cfg.train
        with self.timer.phase("forward"), self.autocast:
            loss = head_cross_entropy(self.engine.hidden(x), self.model.head.weight, y,
                                      m.logit_scale * t.loss_temperature, m.vocab_size,
                                      chunk_tokens(t.logits_chunk_mib, m.vocab_size), soft, t.teacher_weight)
        with self.timer.phase("backward"):
            self.engine.backward(loss, last_micro=last)
        return loss.detach()

    def certificate(self, exact: bool) -> Certificate:
        """Each owner computes its matrices' norms; the sums give every rank the whole table."""
        keys = norm_keys(self.matrices, self.cfg.model.n_heads)
        norm_of = partial(exact_norms, n_heads=self.cfg.model.n_heads) if exact else self.estimator
        with self.wire.category("certificate"):
            norms = self.engine.owned_norms(norm_of, keys)
            return certify(norms, self.engine.embed_rms_max(), self.cfg.model, self.caps)

    def _phase_times(self) -> dict[str, float]:
        """ms per step per phase (device-synchronised), averaged over steps and over ranks: under
        owner-computes each rank's optimiser and constraint work differs (collective)."""
        times = self.timer.averages()
        keys = sorted(k for k in times if k.startswith("ms_"))
        mean = [v / self.env.world_size for v in self.engine.all_sum([times[k] for k in keys])]
        return {**times, **dict(zip(keys, mean))}

    def train_step(self) -> tuple[float, Certificate | None]:
        loss = self.forward_backward()
        if not math.isfinite(loss):
            raise DistlipError(f"loss is {loss} at step {self.step}: training diverged; lower optim.lr "
                               f"(now {self.cfg.optim.lr}) or check the data. Saved files were left untouched.")
        info = self.engine.step(self.step, self.cfg.train.steps)
        self.lr = info.lr
        cert = None
        every = self.cfg.train.certify_every
        if every and (self.step % every == 0 or self.step == self.cfg.train.steps - 1):
            with self.timer.phase("certificate"):
                cert = self.certificate(exact=False)
        self.timer.end_step()
        self.step += 1
        return loss, cert

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and top-1 hits of one batch, the head's logits a chunk at a time."""
        m = self.cfg.model
        chunk = chunk_tokens(self.cfg.train.logits_chunk_mib, m.vocab_size)
        return head_loss_and_correct(self.engine.hidden(x), self.model.head.weight, y, m.logit_scale,
                                     m.vocab_size, chunk)

    @torch.no_grad()
    def paper_protocol(self) -> dict:
        """Loss and accuracy by the paper's protocol (`distlip.paper_protocol`), batches split
        over ranks; {} when the validation split is too short for it (collective)."""
        windows = protocol_windows(self.data.val_ids, self.cfg.seq_len()) if self.data.val_ids is not None else None
        if windows is None:
            return {}
        x, y = windows
        self.model.eval()
        with self.autocast:
            sums = batch_scores(self._score, x, y, device=self.device,
                                batch_ids=range(self.env.rank, len(x) // BATCH_SIZE, self.env.world_size))
        self.model.train()
        loss_sum, acc_sum, count = self.engine.all_sum(list(sums))
        return {"paper_val_loss": loss_sum / count, "paper_val_acc": acc_sum / count,
                "paper_protocol": describe(self.cfg.seq_len())}

    def _average(self, last: Certificate) -> tuple[dict[str, torch.Tensor], Certificate, dict]:
        """Put the mean of the weights at the run's last `train.average_last` checkpoints into the
        engine for the final evaluation and export (collective). Returns (those weights, their
        exact certificate, the summary's fields: the steps averaged and the last step's figures)."""
        t = self.cfg.train
        with self.wire.category("eval"):
            last_loss, last_acc = evaluate(self.engine, self.data.val_x, self.data.val_y, self.autocast)
        weights, found = average_checkpoints(self.out, averaged_steps(t.steps, t.save_every, t.average_last))
        self.engine.load_weights(weights)
        cert, _ = certify_weights(weights, self.cfg)
        return weights, cert, {"averaged_steps": found, "last_val_loss": last_loss, "last_val_acc": last_acc,
                               "last_lipschitz_bound": last.bound}

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.env.is_main
        logger = MetricsLogger(self.out, enabled=main, tensorboard=t.tensorboard, append=self.resumed is not None)
        progress = Progress(t.steps, initial=self.step, enabled=t.progress and main)
        n_params = sum(p.numel() for p in self.model.parameters())
        tokens_per_step = t.batch_size * cfg.seq_len()
        init_cert = self.certificate(exact=True)
        logger.log({"step": self.step, "event": "resume" if self.resumed else "start", "loss": None,
                    "lipschitz_bound": init_cert.bound, "world_size": self.env.world_size,
                    # the stage in effect: one process (or the colnorm embedding) runs without DeepSpeed
                    "zero_stage": cfg.dist.zero_stage if self.engine.ds is not None else 0,
                    "deepspeed": self.engine.ds is not None, "params": n_params,
                    "device": str(self.device), "dtype": t.dtype, "constraint": cfg.constraint.method})
        tempered = f", loss on {t.loss_temperature:g}·logits" if t.loss_temperature != 1 else ""
        dropped = f", dropout {cfg.model.dropout:g} in training" if cfg.model.dropout else ""
        taught = f", distilled from {t.teacher} (weight {t.teacher_weight:g})" if t.teacher else ""
        progress.write(f"distlip: {n_params / 1e6:.2f}M parameters, {constraint_summary(cfg.constraint)}{tempered}"
                       f"{dropped}{taught}, "
                       f"{t.steps} steps × {tokens_per_step} tokens on {self.device}")
        start = last_time = time.perf_counter()
        last_step, cert, loss = self.step, init_cert, float("nan")
        preemption = PreemptionHandler()  # SIGUSR2 / SIGTERM set a flag; all ranks agree at a step boundary
        try:
            while self.step < t.steps:
                loss, new_cert = self.train_step()
                cert = new_cert or cert
                if t.exact_certify_every and self.step % t.exact_certify_every == 0:
                    cert = self.certificate(exact=True)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    now = time.perf_counter()
                    tok_s = (self.step - last_step) * tokens_per_step / (now - last_time)
                    last_time, last_step = now, self.step
                    record = {"step": self.step, "loss": loss, "lr": self.lr,
                              "lipschitz_bound": cert.bound, "max_cap_ratio": cert.max_cap_ratio,
                              "tokens_per_s": tok_s, **self._phase_times(), **self.engine.log_fields()}
                    record.update(self.wire.log_fields())
                    logger.log(record)
                    self.guard.check(self.step, loss)
                    progress.update(self.step, {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}",
                                                "L≤": f"{cert.bound:.3g}"})
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    with self.engine.at_master_weights(), self.wire.category("eval"):  # mid-round: global weights
                        vl, va = evaluate(self.engine, self.data.val_x, self.data.val_y, self.autocast, t.eval_windows)
                    logger.log({"step": self.step, "loss": loss, "lipschitz_bound": cert.bound,
                                "val_loss": vl, "val_acc": va})
                    progress.write(f"step {self.step}: val_loss {vl:.4f}  val_acc {va:.2%}  L≤{cert.bound:.3g}")
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    self.save()
                if preemption.should_stop():
                    self.save()
                    logger.log({"step": self.step, "event": "preempted"})
                    if main:
                        print(f"distlip: preemption signal: checkpoint of step {self.step} committed in {self.out}; "
                              f"exiting with status {REQUEUE_EXIT_CODE} to be requeued", file=sys.stderr, flush=True)
                    exit_for_requeue()
            train_time = time.perf_counter() - start
            final = self.certificate(exact=True)
            if t.average_last > 1:
                weights, final, averaged = self._average(final)
            else:
                weights, averaged = self.engine.master_weights(), {}
            with self.wire.category("eval"):
                vl, va = evaluate(self.engine, self.data.val_x, self.data.val_y, self.autocast)
                paper = self.paper_protocol()
            violations = final.violations(self.caps)
            summary = {"step": self.step, "loss": loss, "lipschitz_bound": final.bound, "val_loss": vl, "val_acc": va,
                       "max_cap_ratio": final.max_cap_ratio, "certified": not violations, "exact": True,
                       "capped": cfg.constraint.method in CAPPED_METHODS, **paper, **averaged,
                       "train_seconds": train_time, "val_tokens": self.data.val_y.numel(), **self.wire.log_fields()}
            logger.log({"event": "final", **summary})
            if main:
                save_model(self.out, weights, cfg, self.data.tokenizer,
                           {"certificate": {"lipschitz_bound": final.bound, "log10_bound": final.log10_bound},
                            "validation": {k: summary[k] for k in ("val_loss", "val_acc", "val_tokens", *paper)},
                            **({"averaged_steps": averaged["averaged_steps"]} if averaged else {})})
        finally:
            preemption.close()
            progress.close()
            logger.close()
        return summary


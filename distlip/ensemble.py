"""Certified ensembles: trained models whose logits are averaged, with a certificate that adds up.

For maps f_i on the same token ids and weights w_i, the triangle inequality gives
max_rms(Σ w_i f_i(x) − Σ w_i f_i(y)) ≤ Σ |w_i|·B_i·d(x, y), with B_i member i's exact
certificate (token ids → logits): the ensemble is certified at Σ |w_i| B_i
(`lipschitz.certificate.weighted_bound`). Members keep their own embeddings, so the ensemble is
certified from token ids only; certified radii in embedding space (`distlip robustness`) belong
to one member.

Weights: w_i = τ_i / Σ_j τ_j, τ_i member i's `train.loss_temperature`. Member i was trained on
the cross-entropy of τ_i·logits_i, so those are its log-probabilities up to a per-token
constant; the ensemble predicts from their mean (log-linear pooling: the normalised geometric
mean of the members' distributions), which is Σ w_i logits_i at the temperature τ = mean_i τ_i.
Its loss is reported at that temperature, its accuracy does not depend on it.

On disk: DIR/ensemble.json (members, weights, temperature, certificate, validation) beside
DIR/member_0, DIR/member_1, … (each an exported model, `checkpoint.export`): self-contained.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distlip.checkpoint.export import ENSEMBLE_FILE, save_model
from distlip.checkpoint.files import atomic_write
from distlip.checkpoint.state import open_model
from distlip.config import Config
from distlip.data.in_memory import val_windows
from distlip.errors import CheckpointError, ConfigError
from distlip.lipschitz.attack import token_pair_attack
from distlip.lipschitz.caps import has_caps
from distlip.lipschitz.certificate import CAP_RTOL, certify_weights, weighted_bound
from distlip.model import LipschitzTransformer
from distlip.paper_protocol import batch_scores, describe, protocol_windows
from distlip.robustness_report import ProbeError, attention_mask, validation_ids

FORMAT = 1


@dataclass
class Member:
    """One trained model of an ensemble: where it came from, the model (CPU, eval mode), its
    config and tokenizer, and its exact certificate (token ids → logits)."""

    source: str
    model: LipschitzTransformer
    cfg: Config
    tokenizer: object
    bound: float
    max_cap_ratio: float


class Ensemble(torch.nn.Module):
    """Σ_i w_i·logits_i of members on the same token ids. `forward`: (B, T) ids → (B, T, V)
    float32 logits; `soft_logits`: (B, T, V) probability vectors over the vocabulary → logits
    (each member embeds them as mixtures of its embedding rows; no document mask), the map the
    attack on the ensemble's certificate ascends."""

    def __init__(self, members: list[Member]):
        super().__init__()
        self.members = members
        self.models = torch.nn.ModuleList(m.model for m in members)
        taus = [m.cfg.train.loss_temperature for m in members]
        self.weights = [t / sum(taus) for t in taus]
        self.temperature = sum(taus) / len(taus)
        self.bound = weighted_bound(self.weights, [m.bound for m in members])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return sum(w * m.model(idx, attention_mask(m.cfg, m.tokenizer, idx))
                   for w, m in zip(self.weights, self.members))

    def soft_logits(self, p: torch.Tensor) -> torch.Tensor:
        return sum(w * m.model.logits_from_embeddings(p.to(m.model.embed.weight.dtype) @ m.model.embed.weight)
                   for w, m in zip(self.weights, self.members))


def open_members(paths: list[str]) -> list[Member]:
    """Open and certify every member (exported models, checkpoints or run directories), or one
    ConfigError naming the member that cannot join: fewer than two, no certificate, a matrix
    over its cap, another tokenizer or another sequence length than the first member's."""
    if len(paths) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(paths)}: give two or more run "
                          "directories, checkpoints or exported models")
    members = []
    for path in paths:
        model, cfg, tok, _ = open_model(path)
        cert, caps = certify_weights({n: p.detach() for n, p in model.named_parameters()}, cfg)
        if not has_caps(caps):
            raise ConfigError(f"'{path}' has no certificate (constraint.method={cfg.constraint.method} caps no "
                              "matrix): an ensemble is certified only when every member is; leave it out")
        bad = cert.violations(caps)
        if bad:
            raise ConfigError(f"'{path}' is not certified: {len(bad)} matrices exceed their cap "
                              f"({', '.join(bad[:3])}); leave it out or export a checkpoint that holds its caps")
        members.append(Member(str(path), model, cfg, tok, cert.bound, cert.max_cap_ratio))
    first = members[0]
    for m in members[1:]:
        if m.tokenizer.to_dict() != first.tokenizer.to_dict():
            raise ConfigError(f"'{m.source}' uses another tokenizer than '{first.source}': an ensemble averages "
                              "logits over one vocabulary; combine models trained with the same tokenizer")
        if m.cfg.seq_len() != first.cfg.seq_len():
            raise ConfigError(f"'{m.source}' reads sequences of {m.cfg.seq_len()} tokens and '{first.source}' of "
                              f"{first.cfg.seq_len()}: combine models of one context length")
    return members


@torch.no_grad()
def score(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, batch: int = 8) -> tuple[float, int]:
    """Summed next-token loss (nats, of temperature·logits) and number of top-1 hits over
    windows `x`, `y` (n, T), `batch` windows at a time (memory: batch × T × V per member)."""
    loss, hits = 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        z = ensemble(xb)
        loss += float(F.cross_entropy((ensemble.temperature * z).flatten(0, 1), yb.flatten(), reduction="sum"))
        hits += int((z.argmax(-1) == yb).sum())
    return loss, hits


def probe(ensemble: Ensemble, x: torch.Tensor, *, steps: int = 30, restarts: int = 2) -> float:
    """Largest ratio `token_pair_attack` finds for the ensemble (in float64) from each window of
    `x` (n, T); one above the certified bound raises ProbeError (the certificate would be wrong)."""
    f = copy.deepcopy(ensemble).double().eval().requires_grad_(False)
    vocab = ensemble.members[0].cfg.model.vocab_size
    found = max(token_pair_attack(f.soft_logits, x[i:i + 1], vocab, steps=steps, restarts=restarts, seed=i)
                for i in range(len(x)))
    if found > ensemble.bound * (1 + CAP_RTOL):
        raise ProbeError(f"the attack found the ratio {found:.6g} above the ensemble's certified bound "
                         f"{ensemble.bound:.6g}: the certificate is wrong for this ensemble (a bug)")
    return found


def validate(ensemble: Ensemble, batch: int = 8) -> dict:
    """Whole validation split of the first member's data, and the Lipschitz-transformer paper's
    protocol beside it (`paper_protocol`) where the split is long enough."""
    first = ensemble.members[0]
    ids = validation_ids(first.cfg, first.tokenizer)
    x, y = val_windows(ids, first.cfg.seq_len())
    loss, hits = score(ensemble, x, y, batch)
    out = {"val_loss": loss / y.numel(), "val_acc": hits / y.numel(), "val_tokens": y.numel()}
    windows = protocol_windows(ids, first.cfg.seq_len())
    if windows is not None:
        loss_sum, acc_sum, count = batch_scores(lambda a, b: score(ensemble, a, b, batch), *windows)
        out.update(paper_val_loss=loss_sum / count, paper_val_acc=acc_sum / count,
                   paper_protocol=describe(first.cfg.seq_len()))
    return out


def check_out(out: str | Path) -> Path:
    """OUT as a Path, or one ConfigError when it exists and is not an empty directory: nothing
    already there (a run, a member) is ever overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"'{out}' already exists and is not an empty directory: give a new directory for the "
                          "ensemble (nothing was written)")
    return out


def save_ensemble(out: str | Path, ensemble: Ensemble, validation: dict | None = None) -> Path:
    """Write OUT/member_K (exported models) and OUT/ensemble.json (OUT as `check_out` allows)."""
    out = check_out(out)
    names = []
    for i, m in enumerate(ensemble.members):
        names.append(f"member_{i}")
        save_model(out / names[-1], {n: p.detach() for n, p in m.model.named_parameters()}, m.cfg, m.tokenizer, {
            "certificate": {"lipschitz_bound": m.bound}, "source": m.source})
    meta = {"format": FORMAT, "members": names, "sources": [m.source for m in ensemble.members],
            "weights": ensemble.weights, "temperature": ensemble.temperature,
            "certificate": {"lipschitz_bound": ensemble.bound, "members": [m.bound for m in ensemble.members]},
            **({"validation": validation} if validation else {})}
    atomic_write(out / ENSEMBLE_FILE, json.dumps(meta, indent=2))
    return out / ENSEMBLE_FILE


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_ensemble(path: str | Path) -> tuple[Ensemble, dict]:
    """An ensemble directory → (the ensemble, re-certified from its members' weights, and the
    contents of its ensemble.json). The members' certificates are recomputed, not read."""
    meta_file = Path(path) / ENSEMBLE_FILE
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"format {meta.get('format')!r}, this version reads {FORMAT}")
        names = meta["members"]
    except Exception as exc:  # JSON, a missing key, another version
        raise CheckpointError(f"'{meta_file}' is not an ensemble.json this distlip version reads "
                              f"({type(exc).__name__}: {exc}): build it again with `distlip ensemble`") from None
    return Ensemble(open_members([str(Path(path) / n) for n in names])), meta


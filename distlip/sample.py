"""Text generation from a trained model: autoregressive sampling with temperature."""

from __future__ import annotations

import torch

from distlip.errors import ConfigError, DataError
from distlip.model import LipschitzTransformer


@torch.no_grad()
def generate(model: LipschitzTransformer, tokenizer, prompt: str, tokens: int = 200, temperature: float = 1.0,
             seed: int = 0) -> str:
    """The `tokens` token continuation of `prompt`, decoded. Temperature 0 is greedy; otherwise
    tokens are drawn from softmax(logits / temperature) with a private generator seeded by `seed`.
    The model sees at most its context length of the latest tokens; generation stops early at
    an end-of-text token."""
    if tokens < 0 or temperature < 0:
        raise ConfigError(f"--tokens ({tokens}) and --temperature ({temperature}) must be ≥ 0")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise DataError("the prompt encodes to no tokens; give some text with --prompt")
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(tokens):
        # the head on the last position only: one token's logits, not the window's
        logits = model.head_logits(model.hidden(model.embed(x[:, -model.cfg.context:]))[0, -1])  # (vocab_size,)
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        if tokenizer.eot_id is not None and nxt.item() == tokenizer.eot_id:
            break
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(x[0, len(ids):].tolist())

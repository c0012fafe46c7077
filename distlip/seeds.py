"""Seeds of named random streams, the one derivation distlip uses: a compressor's mask at
(seed, step, tensor), MARINA's coin at (seed, step, name, "marina"), a power-iteration start
vector at (seed, matrix), a rank's document shuffle at (seed, "shuffle", rank). The same on
every rank and in every run, unlike `hash()`, which Python salts per process."""

import hashlib


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed for the random stream named by `parts` (ints and strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

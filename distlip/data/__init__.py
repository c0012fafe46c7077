"""Data: the packaged Shakespeare corpus, tokenizers, in-memory and streaming batch sources."""

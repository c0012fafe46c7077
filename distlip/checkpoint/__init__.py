"""Persistence: the checkpoint store (commit, verify, rotate), the trainer's saved state, model export."""

"""Lipschitz math independent of distribution: spectral norms, weight constraints, Newton–Schulz, the certificate."""

"""ZOO-Prune: zeroth-order sensitivity of the projector plus sensitivity-aware diverse selection (arXiv 2509.24837)."""

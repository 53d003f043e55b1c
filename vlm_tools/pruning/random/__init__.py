"""Random visual-token pruning: the seeded uniform baseline."""

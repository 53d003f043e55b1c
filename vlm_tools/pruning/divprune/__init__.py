"""DivPrune: diversity-based visual-token pruning (greedy max-min distance)."""

"""`none`: the unpruned reference through the same code path as every method."""

"""FasterVLM-style [CLS]-attention top-k pruning (also the compression of "When Language Overrules")."""

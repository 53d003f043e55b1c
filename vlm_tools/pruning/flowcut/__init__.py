"""FlowCut: information-flow-guided progressive pruning inside the vision tower (plus a text-query LLM stage on
LLaVA-NeXT)."""

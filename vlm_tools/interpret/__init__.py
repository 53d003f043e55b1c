"""Interpretability: attributions (`vlm_tools.explain`), grounding reliability and similarity points.

The package is `interpret`, not `explain`, because `vlm_tools.explain(...)` is the user's one call: a subpackage of
the same name would replace that function on the first import of one of its modules.

- `forcing`: teacher forcing of one answer under any condition, shared by every multi-pass method;
- `frame`: where visual tokens sit on the image (the frame every map lives on);
- `base`: the attribution method protocol; `methods/`: one module per registered attribution method;
- `explanation` / `export`: the result object and its files.
- `sasp`: READ's similarity-as-points (`vlm_tools.similarity_points`: SAM point prompts from a query token).
"""

"""`vlm-tools demo`: every registered pruning method at three budgets, measured on one model.

* :mod:`vlm_tools.demo.runner`: the runs (the embedded default model, or a tiny random LLaVA);
* :mod:`vlm_tools.demo.report`: the results table (Markdown / CSV / JSON) and the self-contained ``report.html``;
* :mod:`vlm_tools.demo.cli`: the ``vlm-tools demo`` sub-command.
"""

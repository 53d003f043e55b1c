"""Shared by the captum baselines: a batch repeated row by row, and the target tokens' log-probs of a forced pass.

captum's `internal_batch_size` (integrated gradients) and `perturbations_per_eval` (occlusion) evaluate the forward
function on `k` copies of the batch concatenated along the batch axis (copy-major: row `r` is sample `r % B`). These
helpers build those rows from an `ExplainContext` and read the explained tokens' log-probabilities back.
"""

from __future__ import annotations

import torch

from vlm_tools.interpret.base import ExplainContext
from vlm_tools.interpret.forcing import ForcedPass

__all__ = ["row_samples", "repeated_inputs", "target_logprobs"]


def row_samples(n_rows: int, samples: list[int]) -> list[int]:
    """The sample of each of `n_rows` rows made of copies of the example list `samples` (row `r` is example
    `r % len(samples)`)."""
    n = len(samples)
    if n == 0 or n_rows % n:
        raise RuntimeError(f"captum evaluated {n_rows} rows, not a whole number of copies of the {n} examples")
    return [samples[r % n] for r in range(n_rows)]


def repeated_inputs(ctx: ExplainContext, rows: list[int]) -> tuple[list, list[str], list[torch.Tensor]]:
    """Images, prompts and answers of the given samples, in row order."""
    return ([ctx.samples[s].image for s in rows], [ctx.samples[s].prompt for s in rows],
            [ctx.samples[s].answer_ids for s in rows])


def target_logprobs(forced: ForcedPass, targets: list[torch.Tensor]) -> torch.Tensor:
    """`(rows, T_max)` fp32 log-probability of each row's explained answer tokens `targets[r]` (indices into its
    answer), 0 after a row's last target. Keeps the autograd graph when the pass has one."""
    lps = forced.answer_logprobs()
    width = max((int(t.numel()) for t in targets), default=0)
    out = []
    for lp, t in zip(lps, targets):
        row = lp[t.to(lp.device)]
        out.append(torch.cat([row, row.new_zeros(width - row.numel())]))
    return torch.stack(out) if out else torch.zeros(0, width)

"""ZOO-Prune scoring: projector sensitivity (zeroth-order or closed-form Jacobian) and the SADS greedy selection.

Zeroth-order sensitivity (the paper): for a bank of m unit directions u_j (one bank shared by all tokens),
`delta_ij = (M(x_i + h u_j) - M(x_i - h u_j)) / 2h` through the real projector M and `S_i = mean_j ||delta_ij||`.
`delta_ij = J_i u_j + O(h^2)`, with J_i the projector's Jacobian at x_i, so S_i is a Monte-Carlo estimate of
`E_u ||J_i u||` for u uniform on the unit sphere of the input space (dimension d).

Closed form ("jacobian" estimator) for `M(x) = W2 act(W1 x + b1) + b2` with an elementwise activation:
`J = W2 diag(g) W1`, `g = act'(W1 x + b1)`, hence

    ||J||_F^2 = tr(W1^T diag(g) W2^T W2 diag(g) W1) = g^T [(W2^T W2) o (W1 W1^T)] g,

one `(T, H) x (H, H)` GEMM per image after a per-model precomputation of the `H x H` matrix
`P = (W2^T W2) o (W1 W1^T)` (o = elementwise product). What is exact and what is not:

- exact: `E_u ||J u||^2 = tr(J^T J E[u u^T]) = ||J||_F^2 / d`, because `E[u u^T] = I/d` on the unit sphere;
- approximate: the score uses `sqrt(||J||_F^2 / d)`, the root-mean-square of ||J u||. By Jensen it is an upper
  bound of `E_u ||J u||`; with `X = ||J u||^2`, `E sqrt(X) ~ sqrt(E X) (1 - Var X / (8 (E X)^2))` and on the sphere
  `Var X = 2 (tr(A^2) - tr(A)^2 / d) / (d (d + 2))`, `A = J^T J`, so the relative gap is O(1/d) times the spread of
  A's spectrum: ~0.1-1% for d = 1024 (CLIP-L) unless J is close to rank one. The per-token gap varies only with
  the spectrum of J_i, so rankings agree closely (measured Spearman in benchmarks/RESULTS.md);
- the zeroth-order estimate itself carries Monte-Carlo noise (m directions) and an O(h^2) difference error, which
  the closed form does not have.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["random_directions", "zeroth_order_sensitivity", "projector_parts", "jacobian_gram",
           "activation_derivative", "jacobian_frobenius_sq", "jacobian_sensitivity", "minmax", "sads_select",
           "projected_norm"]


def random_directions(m: int, dim: int, seed: int) -> torch.Tensor:
    """`(m, dim)` fp32 unit vectors `u_j = g_j / ||g_j||`, `g_j ~ N(0, I)`, from a CPU generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.randn(m, dim, generator=gen, dtype=torch.float32)
    return u / u.norm(dim=1, keepdim=True)


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when the inputs already are (reduced-precision inputs are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeroth_order_sensitivity(projector: nn.Module, x: torch.Tensor, directions: torch.Tensor, step: float,
                             max_rows: int = 16384, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """`S_i = mean_j ||(M(x_i + h u_j) - M(x_i - h u_j)) / 2h||` through the real projector.

    Args:
        projector: the model's projector (its own `forward` is called on `(rows, d)` inputs).
        x: `(T, d)` feature-layer tokens.
        directions: `(m, d)` unit directions, shared by all tokens.
        step: h.
        max_rows: most perturbed rows per projector call (tokens are processed in chunks of `max_rows // 2m`).
        params: fp32 copies of the projector's parameters and buffers; when given, the projector's forward runs
            on them through `torch.func.functional_call` in fp32 (for bf16/fp16 models, whose rounding is
            comparable to `h`); else it runs on its own parameters in their dtype.

    Returns:
        `(T,)` fp32 (fp64 for fp64 projectors) sensitivities.
    """
    p = _param(projector)
    t, d = x.shape
    m = directions.shape[0]
    work = _work_dtype(p.dtype)
    if params is not None:
        work = _work_dtype(next(iter(params.values())).dtype)

        def run(inp):
            return torch.func.functional_call(projector, params, (inp,))
    else:
        def run(inp):
            return projector(inp.to(p.dtype))
    u = directions.to(device=x.device, dtype=work)
    chunk = max(1, max_rows // (2 * m))
    out = []
    for i in range(0, t, chunk):
        xc = x[i:i + chunk].to(work)
        plus = (xc[:, None, :] + step * u[None]).reshape(-1, d)
        minus = (xc[:, None, :] - step * u[None]).reshape(-1, d)
        y = run(torch.cat([plus, minus])).to(work)
        n = plus.shape[0]
        diff = (y[:n] - y[n:]) / (2.0 * step)
        out.append(diff.view(-1, m, diff.shape[-1]).norm(dim=-1).mean(dim=1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=work)


def projector_parts(projector: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """`(linear_1, act, linear_2)` of a LLaVA projector; raises a `TypeError` for any other structure."""
    l1, act, l2 = (getattr(projector, n, None) for n in ("linear_1", "act", "linear_2"))
    if not (isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear) and isinstance(act, nn.Module)):
        raise TypeError(f"the jacobian estimator needs a `linear_1 -> act -> linear_2` projector (HF LLaVA's "
                        f"multi_modal_projector); {type(projector).__name__} is not one; use "
                        "estimator='zeroth_order'")
    named = [n for n, _ in projector.named_children()]
    if set(named) - {"linear_1", "act", "linear_2"}:
        raise TypeError(f"the jacobian estimator supports linear_1 -> act -> linear_2 only; {type(projector).__name__}"
                        f" also has {sorted(set(named) - {'linear_1', 'act', 'linear_2'})}")
    return l1, act, l2


def jacobian_gram(linear_1: nn.Linear, linear_2: nn.Linear) -> torch.Tensor:
    """`P = (W2^T W2) o (W1 W1^T)`, `(H, H)` in fp32 (fp64 for fp64 weights) on the weights' device."""
    work = _work_dtype(linear_1.weight.dtype)
    w1 = linear_1.weight.detach().to(work)
    w2 = linear_2.weight.detach().to(work)
    return (w2.T @ w2) * (w1 @ w1.T)


def activation_derivative(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """`act'(z)` elementwise, in fp32 (fp64 for fp64 inputs).

    Exact for the erf GELU (`Phi(z) + z phi(z)`; LLaVA's `projector_hidden_act="gelu"`); any other elementwise
    activation uses a float64 central difference with step 1e-4 (error ~1e-8 relative for smooth activations).
    """
    from transformers.activations import GELUActivation

    z = z.to(_work_dtype(z.dtype))
    erf_gelu = (type(act) is nn.GELU and act.approximate == "none") or type(act) is GELUActivation
    if erf_gelu:
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    eps = 1e-4
    z64 = z.double()
    return ((act(z64 + eps) - act(z64 - eps)) / (2 * eps)).to(z.dtype)


def jacobian_frobenius_sq(x: torch.Tensor, linear_1: nn.Linear, act: nn.Module, gram: torch.Tensor,
                          chunk: int = 4096) -> torch.Tensor:
    """`(T,)` squared Frobenius norms `||J_i||_F^2 = g_i^T P g_i` of the projector's Jacobian at each token."""
    work = gram.dtype
    w1 = linear_1.weight.detach().to(work)
    b1 = None if linear_1.bias is None else linear_1.bias.detach().to(work)
    out = []
    for i in range(0, x.shape[0], chunk):
        g = activation_derivative(act, F.linear(x[i:i + chunk].to(work), w1, b1))
        out.append(((g @ gram) * g).sum(dim=-1).clamp_min(0.0))
    return torch.cat(out) if out else x.new_zeros(0, dtype=work)


def jacobian_sensitivity(x: torch.Tensor, linear_1: nn.Linear, act: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """`(T,)` closed-form sensitivities `sqrt(||J_i||_F^2 / d)` (the RMS of `||J_i u||` over unit directions)."""
    return (jacobian_frobenius_sq(x, linear_1, act, gram) / x.shape[-1]).sqrt()


def minmax(s: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to [0, 1] (all ones when the scores are constant)."""
    s = s.float()
    lo, hi = s.min(), s.max()
    if not bool(hi - lo > 0):
        return torch.ones_like(s)
    return (s - lo) / (hi - lo)


def sads_select(scores: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """Sensitivity-aware diverse selection (greedy).

    First the highest score, then repeatedly `argmax_i  s_i * min_{p in picked} (1 - cos(z_i, z_p))` over the tokens
    not yet picked (first index on ties).

    Args:
        scores: `(T,)` normalised sensitivities.
        z: `(T, D)` projected features.
        k: number of tokens to pick (at most T).

    Returns:
        `(k,)` picked positions, in the order picked.
    """
    t = scores.shape[0]
    k = min(int(k), t)
    zn = F.normalize(z.float(), dim=-1)
    s = scores.float()
    mind = torch.full((t,), float("inf"), device=s.device)
    avail = torch.ones(t, dtype=torch.bool, device=s.device)
    picked = []
    for step in range(k):
        crit = s.clone() if step == 0 else s * mind
        crit = crit.masked_fill(~avail, float("-inf"))
        i = int(torch.argmax(crit))
        picked.append(i)
        avail[i] = False
        mind = torch.minimum(mind, (1.0 - zn @ zn[i]).clamp_min(0.0))
    return torch.tensor(picked, dtype=torch.long, device=s.device)


def projected_norm(projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`(T,)` norms of the projected tokens `||M(x_i)||` (the trivial baseline the sensitivities are compared to)."""
    p = _param(projector)
    return projector(x.to(p.dtype)).float().norm(dim=-1)

"""Whole-weight pruning methods as small pure functions on one weight matrix ``W`` of shape ``[out, in]``
(Hugging Face ``nn.Linear`` layout; GPT-2 ``Conv1D`` weights are transposed by the caller).

Every function returns a **keep-mask** (True = the entry survives), the convention of
``compress.sparsify.protect``: a protection mask is ORed in by giving protected entries an infinite score, so
they are chosen first and count towards the kept total, and a final ``| keep`` guarantees them even when more
entries are protected than the target allows.

- ``magnitude``: score |W|, compared **per layer** (one threshold over the whole matrix), as the magnitude
  baseline of the Wanda paper (Sun et al. 2023, ``prune_magnitude`` in locuslab/wanda).
- ``wanda``: score |W_ij|·‖X_j‖₂ (X_j: the j-th input feature over every calibration token), compared **per
  output row** (Sun et al. 2023, Eq. 1 and §3 "comparison group"; ``prune_wanda`` prunes ``int(in·s)`` per
  row with a stable sort; here rows take one more where needed so the layer total is ``round(numel·s)``).
- ``sparsegpt``: OBS reconstruction (Frantar & Alistarh 2023, Algorithm 1; ``fasterprune`` in
  IST-DASLab/sparsegpt): columns processed left to right in blocks of ``blocksize``; the mask of a block is
  chosen adaptively from w²/[H⁻¹]²_jj when the block starts (unstructured) or every M columns (N:M); every
  pruned weight's error is spread over the not-yet-processed columns through the upper Cholesky factor of
  (H + λI)⁻¹ with λ = ``percdamp``·mean(diag H). Unlike the reference, which prunes ``int(s·n)+1`` entries per
  block (``<= thresh``), exactly ``round(s·n)`` are pruned.
- Protection (``keep``: True where an entry is protected, ``compress.sparsify.protect``): a layer is pruned to
  a **zero budget** ``zeros = (z_free, z_protected)``: z_protected lowest-scoring protected entries (0 keeps
  them dense; ``--protect-sparsity`` sets more) and z_free lowest-scoring free entries, each selection within
  the method's comparison group (Wanda: each row takes its share of z_free in proportion to its free entries,
  so rows whose entries are all protected push their share onto the others; magnitude: the layer; SparseGPT:
  each column block). Without ``zeros`` a protected layer keeps the layer total round(numel·s), all from the
  free entries (``layer_zeros``); ``allot_zeros`` moves what a layer cannot take to the other layers of its
  block, so that the requested sparsity is met exactly over the pruned parameters.
- N:M patterns (``nm=(n, m)``: keep n of every m consecutive inputs of a row, NVIDIA's "2:4" = 2 kept of 4):
  within each group the m−n lowest scores are pruned, for every method (the papers' semi-structured setting);
  a trailing partial group (input size not a multiple of m) prunes its share (``nm_prune_count``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from compress.errors import CompressError

NM = tuple[int, int]


def parse_pattern(pattern: str) -> NM | None:
    """'unstructured' → None; 'N:M' → (N, M) with 0 < N < M (N kept of every M)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise CompressError(f"pattern '{pattern}': use unstructured or N:M (e.g. 2:4, 4:8)") from None
    if not 0 < n < m:
        raise CompressError(f"pattern '{pattern}': N:M needs 0 < N < M (N weights kept of every M)")
    return n, m


Zeros = tuple[int, int]  # (zeros among free entries, zeros among protected entries)


def split_counts(total: int, capacity: torch.Tensor) -> torch.Tensor:
    """``total`` spread over groups in proportion to ``capacity`` (int tensor): floors, then one more to the
    groups with the largest remainders (lowest index first on ties), never above a group's capacity."""
    capacity = capacity.to(torch.long)
    cap = int(capacity.sum())
    if total > cap:
        raise CompressError(f"cannot prune {total} entries out of {cap}")
    if total <= 0 or cap == 0:
        return torch.zeros_like(capacity)
    exact = capacity.double() * total / cap
    counts = torch.minimum(exact.floor().long(), capacity)
    rest = total - int(counts.sum())
    if rest:
        frac = torch.where(counts < capacity, exact - counts.double(), torch.full_like(exact, -1.0))
        order = torch.sort(-frac, stable=True).indices[:rest]
        counts[order] += 1
    return counts


def layer_zeros(numel: int, sparsity: float, protected: int, protect_sparsity: float = 0.0) -> Zeros:
    """A layer's zero budget: round(numel·s) zeros in all, round(protected·x) of them among the protected entries,
    the rest among the free entries (as many as there are, at most)."""
    zp = int(round(protected * protect_sparsity))
    return max(0, min(int(round(numel * sparsity)) - zp, numel - protected)), zp


def allot_zeros(numel: Sequence[int], protected: Sequence[int], groups: Sequence, sparsity: Sequence[float],
                protect_sparsity: float = 0.0) -> list[Zeros]:
    """Zero budgets of many layers so that every group (a block) still prunes Σ round(numel·s) entries, and the
    whole model Σ over all layers, when protected entries take fewer zeros than their share: what a layer's free
    entries cannot take goes to the other layers of its group in proportion to their spare free entries, then to
    every layer. In a group with protected entries, the group's zeros are first spread over all its free entries
    (layer shares ∝ free entries × sparsity), so the other heads of a protected layer are pruned like the rest of
    the block, not harder. A surplus (protected entries pruned harder than their layer) is taken back in
    proportion to the free zeros. Raises when the free entries of the whole model cannot take the request."""
    n = len(numel)
    target = [int(round(numel[i] * sparsity[i])) for i in range(n)]
    zp = [int(round(protected[i] * protect_sparsity)) for i in range(n)]
    free = torch.tensor([numel[i] - protected[i] for i in range(n)], dtype=torch.long)
    zu = torch.tensor([min(max(target[i] - zp[i], 0), int(free[i])) for i in range(n)], dtype=torch.long)

    def settle(idx: list[int], want: int) -> None:
        have = int(zu[idx].sum())
        if want > have:
            add = min(want - have, int((free[idx] - zu[idx]).sum()))
            zu[idx] += split_counts(add, free[idx] - zu[idx])
        elif want < have:
            zu[idx] -= split_counts(min(have - want, have), zu[idx].clone())

    for g in dict.fromkeys(groups):
        idx = [i for i in range(n) if groups[i] == g]
        want_g = sum(target[i] - zp[i] for i in idx)
        if any(protected[i] for i in idx):
            # spread the block's zeros over all its free entries (each layer's share ∝ free × its sparsity):
            # left inside the protected layer, they would prune that layer's other heads far harder than the
            # rest (k/v at 0.8 when one of four KV groups is kept at s = 0.6)
            w = torch.tensor([float(free[i]) * sparsity[i] for i in idx], dtype=torch.float64)
            share = (w * max(want_g, 0) / w.sum()).floor().long() if float(w.sum()) > 0 else torch.zeros(len(idx),
                                                                                                        dtype=torch.long)
            zu[idx] = torch.minimum(share, free[idx])
        settle(idx, want_g)
    everything = list(range(n))
    want = sum(target) - sum(zp)
    settle(everything, want)
    if int(zu.sum()) != want:
        raise CompressError(f"protection leaves {int(free.sum()):,} free weights, fewer than the "
                            f"{want:,} zeros the requested sparsity needs among them; protect fewer heads or "
                            "set --protect-sparsity")
    return [(int(zu[i]), zp[i]) for i in range(n)]


def _select_lowest(scores: torch.Tensor, among: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, the ``counts[r]`` lowest scores among the entries where ``among`` is True (stable order)."""
    rows, cols = scores.shape
    order = torch.sort(scores.masked_fill(~among, float("inf")), dim=1, stable=True).indices
    ranks = torch.arange(cols, device=scores.device).expand(rows, cols)
    chosen = ranks < counts.to(scores.device)[:, None]
    return torch.zeros_like(among).scatter_(1, order, chosen)


def budget_mask(scores: torch.Tensor, keep: torch.Tensor, zeros: Zeros, per_row: bool) -> torch.Tensor:
    """Keep-mask that prunes ``zeros = (z_free, z_protected)`` lowest scores among the free and the protected
    entries, per output row (each row's share in proportion to its entries of either kind) or over the whole
    matrix."""
    zu, zp = zeros
    if not per_row:
        flat, k = scores.reshape(1, -1), keep.reshape(1, -1)
        pruned = (_select_lowest(flat, ~k, torch.tensor([zu])) |
                  _select_lowest(flat, k, torch.tensor([zp])))
        return ~pruned.reshape(scores.shape)
    cu = split_counts(zu, (~keep).sum(1))
    cp = split_counts(zp, keep.sum(1))
    return ~(_select_lowest(scores, ~keep, cu) | _select_lowest(scores, keep, cp))


def _protected_scores(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return scores
    return scores.masked_fill(keep, float("inf"))


def _with_keep(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return mask if keep is None else mask | keep


def nm_prune_count(width: int, nm: NM) -> int:
    """How many of a group of ``width`` consecutive inputs to prune: m−n for a full group; for the trailing
    partial group of a layer whose input size is not a multiple of m, round(width·(m−n)/m), so the layer stays
    at sparsity 1−n/m (the reference code has no rule for it; hardware N:M needs multiples of m anyway)."""
    n, m = nm
    return m - n if width == m else int(round(width * (m - n) / m))


def nm_mask(scores: torch.Tensor, nm: NM, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the n largest scores of every m consecutive inputs of each row."""
    n, m = nm
    rows, cols = scores.shape
    scores = _protected_scores(scores, keep)
    full = cols - cols % m
    mask = torch.ones_like(scores, dtype=torch.bool)
    groups = scores[:, :full].reshape(rows, full // m, m)
    pruned = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask[:, :full] = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, pruned, False).reshape(rows, full)
    tail = nm_prune_count(cols - full, nm)
    if tail:
        idx = torch.topk(scores[:, full:], tail, dim=1, largest=False).indices
        mask[:, full:] = torch.ones_like(scores[:, full:], dtype=torch.bool).scatter_(1, idx, False)
    return _with_keep(mask, keep)


def row_counts(rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Entries to prune in each row: ``int(in·s)`` (Wanda's count), plus one in the first rows until the matrix
    total is ``round(numel·s)``, so that the layer's sparsity is the requested one even when ``in·s`` is not
    whole (the reference floors every row: 44 of 64 at s = 0.7 is 0.6875)."""
    base = int(cols * sparsity)
    extra = min(max(int(round(rows * cols * sparsity)) - rows * base, 0), rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def row_mask(scores: torch.Tensor, sparsity: float, keep: torch.Tensor | None = None,
             zeros: Zeros | None = None) -> torch.Tensor:
    """Prune the lowest scores of every output row (Wanda's comparison group), ``row_counts`` per row; with
    protection, the layer's zero budget (``budget_mask``, default ``layer_zeros``)."""
    rows, cols = scores.shape
    if keep is not None:
        return budget_mask(scores, keep, zeros or layer_zeros(scores.numel(), sparsity, int(keep.sum())), True)
    counts = row_counts(rows, cols, sparsity).to(scores.device)
    order = torch.sort(_protected_scores(scores, keep), dim=1, stable=True).indices
    ranks = torch.arange(cols, device=scores.device).expand(rows, cols)
    pruned = ranks < counts[:, None]  # the first counts[r] entries of row r's ascending order
    mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, ~pruned)
    return _with_keep(mask, keep)


def tensor_mask(scores: torch.Tensor, sparsity: float, keep: torch.Tensor | None = None,
                zeros: Zeros | None = None) -> torch.Tensor:
    """Prune the ``round(numel·s)`` lowest scores of the whole matrix (per-layer comparison, magnitude
    pruning; SparseGPT's block selection); with protection, the zero budget (``budget_mask``)."""
    if keep is not None:
        return budget_mask(scores, keep, zeros or layer_zeros(scores.numel(), sparsity, int(keep.sum())), False)
    k = int(round(scores.numel() * sparsity))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(_protected_scores(scores, keep).reshape(-1), stable=True).indices
        mask[order[:k]] = False
    return _with_keep(mask.reshape(scores.shape), keep)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.abs().float()


def wanda_scores(w: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂; ``col_norm`` [in] is the L2 norm of each input feature over the calibration tokens."""
    return w.abs().float() * col_norm.float().reshape(1, -1)


def magnitude_mask(w: torch.Tensor, sparsity: float, nm: NM | None = None,
                   keep: torch.Tensor | None = None, zeros: Zeros | None = None) -> torch.Tensor:
    s = magnitude_scores(w)
    return nm_mask(s, nm, keep) if nm else tensor_mask(s, sparsity, keep, zeros)


def wanda_mask(w: torch.Tensor, col_norm: torch.Tensor, sparsity: float, nm: NM | None = None,
               keep: torch.Tensor | None = None, zeros: Zeros | None = None) -> torch.Tensor:
    s = wanda_scores(w, col_norm)
    return nm_mask(s, nm, keep) if nm else row_mask(s, sparsity, keep, zeros)


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + λI)⁻¹, dead columns) as SparseGPT prepares it. Depends only on H, so a
    pruner computes it once per layer and reuses it for every strategy."""
    h = h.double().clone()  # float64: the factor of a near-singular H is where float32 loses the update
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(hinv, upper=True).float(), dead
    except torch.linalg.LinAlgError:
        raise CompressError("SparseGPT: the calibration Hessian is not positive definite even after dampening; "
                            "raise --percdamp or use more calibration samples") from None


def obs_group_errors(w: torch.Tensor, u: torch.Tensor, pruned: torch.Tensor,
                     max_elements: int = 1 << 26) -> torch.Tensor:
    """The OBS errors of SparseGPT's column loop over one group of columns whose masks are fixed: for each row,
    err[i] = pruned[i]·(w[i] − Σ_{j<i} err[j]·u[j, i]) / u[i, i], with ``u`` the group's block of the upper
    Cholesky factor of H⁻¹ (``inverse_hessian_factor``). The recurrence is one upper-triangular system per row,
    err·T = pruned·w with T = diag(u) + striu(u)·diag(pruned), solved for all rows at once instead of one column
    at a time (the loop's cost on a GPU is its kernel launches, 6 per column). ``w``, ``pruned``: [..., rows, g];
    rows go in chunks of at most ``max_elements`` entries of T."""
    shape = w.shape
    g = shape[-1]
    w2, m2 = w.reshape(-1, g), pruned.reshape(-1, g)
    strict = torch.triu(u, 1)
    diag = torch.diag_embed(torch.diag(u))
    out = torch.empty_like(w2)
    step = max(1, max_elements // (g * g))
    for r in range(0, w2.shape[0], step):
        m = m2[r:r + step].to(w.dtype)
        t = strict.unsqueeze(0) * m.unsqueeze(1) + diag
        rhs = (w2[r:r + step] * m).unsqueeze(1)
        out[r:r + step] = torch.linalg.solve_triangular(t, rhs, upper=True, left=False).squeeze(1)
    return out.reshape(shape)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor | None, sparsity: float, nm: NM | None = None, *,
                    blocksize: int = 128, percdamp: float = 0.01, keep: torch.Tensor | None = None,
                    hinv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, keep-mask): SparseGPT's one-shot OBS pruning of ``w`` [out, in] with the layer's input
    Hessian ``h`` = XᵀX [in, in] (or its precomputed ``inverse_hessian_factor`` as ``hinv``)."""
    W, mask = sparsegpt_prune_many(w, h, [sparsity], nm, blocksize=blocksize, percdamp=percdamp, keep=keep,
                                   hinv=hinv)
    return W[0], mask[0]


def sparsegpt_prune_many(w: torch.Tensor, h: torch.Tensor | None, sparsities: Sequence[float],
                         nm: NM | None = None, *, blocksize: int = 128, percdamp: float = 0.01,
                         keep: torch.Tensor | None = None, hinv: tuple[torch.Tensor, torch.Tensor] | None = None,
                         zeros: Sequence[Zeros] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT for several sparsities of one layer at once: (weights [B, out, in], keep-masks [B, out, in]).

    Each slice b is exactly ``sparsegpt_prune(w, h, sparsities[b])``; the B problems share the column loop, so on a
    GPU (where the loop is bound by kernel launches, not arithmetic) B strategies cost about what one does. This
    is what makes K strategies from one calibration cheap for SparseGPT (``Pruner.prune_many``).

    With ``keep`` (unstructured), strategy b prunes its zero budget ``zeros[b]`` (default ``layer_zeros``), each
    column block taking its share in proportion to its free and protected entries. When no protected entry is
    to be pruned (z_protected = 0) the protected entries come back exactly as they were in ``w``: a protected row
    has nothing pruned and so no error to spread, and the caller drops wholly protected columns from the problem
    (``Pruner``: H restricted to the free columns, the OBS solution with those columns held fixed).
    """
    B = len(sparsities)
    W = w.detach().float().unsqueeze(0).repeat(B, 1, 1)
    _, rows, cols = W.shape
    if nm and blocksize % nm[1]:
        raise CompressError(f"SparseGPT {nm[0]}:{nm[1]}: the column block size {blocksize} must be a multiple of "
                            f"{nm[1]}")
    Hinv, dead = hinv if hinv is not None else inverse_hessian_factor(h, percdamp)
    W[:, :, dead] = 0
    pruned = torch.zeros_like(W, dtype=torch.bool)
    blocks = list(range(0, cols, blocksize))
    shares = None
    if keep is not None and nm is None:
        budgets = list(zeros) if zeros is not None else [
            layer_zeros(w.numel(), s, int(keep.sum())) for s in sparsities]
        free_b = torch.tensor([int((~keep[:, i:i + blocksize]).sum()) for i in blocks])
        prot_b = torch.tensor([int(keep[:, i:i + blocksize].sum()) for i in blocks])
        shares = [(split_counts(zu, free_b), split_counts(zp, prot_b)) for zu, zp in budgets]
    for nb, i1 in enumerate(blocks):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep1 = None if keep is None else keep[:, i1:i2]
        if nm is None and shares is not None:
            score = W1 ** 2 / d.reshape(1, 1, -1) ** 2
            mask1 = torch.stack([~budget_mask(score[b], keep1, (int(shares[b][0][nb]), int(shares[b][1][nb])), False)
                                 for b in range(B)])
        elif nm is None:
            score = W1 ** 2 / d.reshape(1, 1, -1) ** 2
            # True = pruned, as in the reference
            mask1 = torch.stack([~tensor_mask(score[b], s) for b, s in enumerate(sparsities)])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        # the reference's column loop, one group of columns at a time: the whole block when its mask is known
        # up front, else each N:M group, whose mask is chosen from the weights as the earlier groups left them
        group = nm[1] if nm is not None else i2 - i1
        for a in range(0, i2 - i1, group):
            b = min(a + group, i2 - i1)
            if nm is not None:
                score = W1[:, :, a:b] ** 2 / d[a:b].reshape(1, 1, -1) ** 2
                score = _protected_scores(score, None if keep1 is None else keep1[:, a:b])
                count = nm_prune_count(b - a, nm)
                if count:
                    mask1.scatter_(2, a + torch.topk(score, count, dim=2, largest=False).indices, True)
                if keep1 is not None:
                    mask1[:, :, a:b] &= ~keep1[:, a:b]
            err = obs_group_errors(W1[:, :, a:b], Hinv1[a:b, a:b], mask1[:, :, a:b])
            Err1[:, :, a:b] = err
            W1[:, :, a:] -= err @ Hinv1[a:b, a:]
        W[:, :, i1:i2] = W1.masked_fill(mask1, 0.0)
        pruned[:, :, i1:i2] = mask1
        W[:, :, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask = ~pruned & ~dead.reshape(1, 1, -1)
    if keep is not None:
        # protected entries not chosen for pruning keep their dense value (also in dead columns); where nothing
        # in their row was pruned this is what the update left anyway
        hold = keep.unsqueeze(0) & ~pruned
        W = torch.where(hold, w.detach().float().unsqueeze(0), W)
        mask |= hold
    return W.to(w.dtype), mask


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """‖W Xᵀ − Ŵ Xᵀ‖_F for inputs ``x`` [tokens, in]: the layer-wise objective SparseGPT minimizes."""
    return float(torch.linalg.matrix_norm((w.float() - w_hat.float()) @ x.float().T))

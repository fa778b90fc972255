"""Ranking metrics: one path that every method (base, Persona, ablations, fine-tuning) goes through.

Two protocols, never mixed in one table:

* **full ranking** (the headline): :func:`target_ranks` ranks the target against the whole catalogue;
* **sampled** (only to line up with the literature): :func:`sample_negatives` draws e.g. 99 negatives and
  :func:`sampled_ranks` ranks the target among them with random tie-breaking.

Both return 0-based ranks, which :class:`RankingMetrics` turns into HR@k, NDCG@k and MRR.

Example::

    >>> scores = torch.tensor([[9.0, 9.0, 0.3, 0.1, 0.2]])  # items 0 and 1 are PAD/UNK: never ranked
    >>> target_ranks(scores, torch.tensor([3]))
    tensor([2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Items 0 (PAD) and 1 (UNK) are never rankable; real items start here.
FIRST_ITEM = 2

# Rows of a [B, N] comparison done at once: bounds the temporary bool tensor to ~16 MB whatever B and N.
_CHUNK_ELEMENTS = 1 << 24


def _check_scores_targets(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must be [B={scores.shape[0]}], got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"targets must lie in [0, {scores.shape[1]})")


def default_invalid(n_items: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The items that are never rankable by default: PAD (0) and UNK (1). Returns bool [N]."""
    invalid = torch.zeros(n_items, dtype=torch.bool, device=device)
    invalid[:FIRST_ITEM] = True
    return invalid


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, *, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target against the full catalogue.

    Args:
        scores: float [B, N]; column j is item index j (the whole catalogue).
        targets: int64 [B], the true next item of each row.
        invalid: bool [N], items that are never rankable (they neither compete nor can be hit).
            Default: columns 0 (PAD) and 1 (UNK).

    Returns:
        int64 [B]: the number of *other* valid items scoring strictly higher than the target **plus** the
        number of other valid items scoring exactly the same.

    Ties are pessimistic on purpose: a model that gives every item the same score (a constant, a collapsed
    head) ranks every target last and gets no hits, instead of being rewarded by an index-order tie-break.
    A NaN score counts against the target too (a NaN target ranks behind every valid item). A target that is
    itself invalid (e.g. UNK for an item the model never saw) cannot be hit: its rank is the number of valid
    items, a miss at every cut-off, so it still counts in the denominator.

    Memory: no sort. Each row is compared with its target's score, chunked so that the temporary
    bool tensor stays around 16 MB; N = 1M with B = 4 costs a few milliseconds.
    """
    _check_scores_targets(scores, targets)
    batch, n_items = scores.shape
    if invalid is None:
        invalid = default_invalid(n_items, scores.device)
    if invalid.shape != (n_items,) or invalid.dtype != torch.bool:
        raise ValueError(f"invalid must be bool [N={n_items}], got {invalid.dtype} {tuple(invalid.shape)}")
    valid = ~invalid.to(scores.device)
    target_valid = valid[targets]  # [B]
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]

    ranks = torch.empty(batch, dtype=torch.int64, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(n_items, 1))
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        # ~(s < t) is s >= t, and also true when either side is NaN: NaN never helps the target.
        at_least = ~(scores[rows] < target_scores[rows]) & valid  # [b, N]
        ranks[rows] = at_least.sum(dim=1)
    # A valid target counted itself once above; it is not an "other" item. An invalid one is a sure miss.
    n_valid = valid.sum()
    return torch.where(target_valid, ranks - 1, n_valid)


def sampled_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """0-based rank of each target among sampled negatives (the literature's protocol; not the headline).

    Args:
        scores: float [B, N] over the full catalogue (column j = item j).
        targets: int64 [B].
        negatives: int64 [B, S], items to rank the target against (e.g. 99 from :func:`sample_negatives`);
            none may equal its row's target.
        generator: source of the tie-breaking randomness, so runs are reproducible.

    Returns:
        int64 [B] in [0, S]: negatives scoring strictly higher, plus a uniform draw in [0, ties], i.e. the
        target takes a uniformly random position among the items with its score. A NaN on either side
        counts as a higher negative.
    """
    _check_scores_targets(scores, targets)
    if negatives.dim() != 2 or negatives.shape[0] != scores.shape[0] or negatives.dtype != torch.int64:
        raise ValueError(f"negatives must be int64 [B, S], got {negatives.dtype} {tuple(negatives.shape)}")
    if negatives.numel() and (int(negatives.min()) < 0 or int(negatives.max()) >= scores.shape[1]):
        raise ValueError(f"negatives must lie in [0, {scores.shape[1]})")
    if bool((negatives == targets[:, None]).any()):
        raise ValueError("a negative equals its row's target; sample negatives with sample_negatives()")
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    negative_scores = scores.gather(1, negatives)  # [B, S]
    higher = (~(negative_scores <= target_scores)).sum(dim=1)  # [B]; NaN on either side counts as higher
    ties = (negative_scores == target_scores).sum(dim=1)  # [B]
    uniform = torch.rand(targets.shape[0], generator=generator, device=generator.device)
    # floor(u * (ties + 1)) is uniform over {0, ..., ties}; u < 1 keeps it inside the range.
    offset = (uniform.to(scores.device, torch.float64) * (ties + 1).to(torch.float64)).floor().to(torch.int64)
    return higher + torch.minimum(offset, ties)


def sample_negatives(
    n_items: int,
    targets: torch.Tensor,
    n: int,
    generator: torch.Generator,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``n`` distinct negatives per row, uniformly among valid items (index >= 2), never the target.

    Args:
        n_items: catalogue size N, PAD and UNK included.
        targets: int64 [B].
        n: negatives per row, S.
        generator: the only source of randomness (reproducible runs).
        exclude: optional items that must not be drawn either: int64 [K] for every row, or [B, K] per
            row (e.g. each user's history; padding with 0 is harmless since 0 is never drawn).

    Returns:
        int64 [B, S] on ``targets``' device: each row a uniformly random S-subset of the allowed items.

    Raises:
        ValueError: a row has fewer than ``n`` allowed items.
    """
    if targets.dim() != 1 or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [B], got {targets.dtype} {tuple(targets.shape)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    batch = targets.shape[0]
    if n == 0 or batch == 0:
        return torch.empty(batch, n, dtype=torch.int64, device=targets.device)
    if n_items - FIRST_ITEM - 1 < n:
        raise ValueError(f"cannot draw {n} negatives from {n_items - FIRST_ITEM} items minus the target")
    gen_device = generator.device
    targets_g = targets.to(gen_device)
    exclude_g = None if exclude is None else exclude.to(gen_device, torch.int64)
    if exclude_g is not None and not (exclude_g.dim() == 1 or exclude_g.shape[:1] == (batch,)):
        raise ValueError(f"exclude must be [K] or [B={batch}, K], got shape {tuple(exclude_g.shape)}")

    if batch * n_items <= _CHUNK_ELEMENTS:
        out = _sample_by_keys(n_items, targets_g, n, generator, exclude_g)
    else:
        out = _sample_by_rejection(n_items, targets_g, n, generator, exclude_g)
    return out.to(targets.device)


def _sample_by_keys(
    n_items: int, targets: torch.Tensor, n: int, generator: torch.Generator, exclude: torch.Tensor | None
) -> torch.Tensor:
    """Small catalogues: the n smallest of B x N uniform keys, forbidden items keyed +inf. Exact."""
    batch = targets.shape[0]
    keys = torch.rand(batch, n_items, generator=generator, device=targets.device)  # [B, N]
    keys[:, :FIRST_ITEM] = math.inf
    keys.scatter_(1, targets[:, None], math.inf)
    if exclude is not None and exclude.numel():
        if exclude.dim() == 1:
            keys[:, exclude] = math.inf
        else:
            keys.scatter_(1, exclude, math.inf)
    chosen_keys, chosen = keys.topk(n, dim=1, largest=False)
    if bool(torch.isinf(chosen_keys).any()):
        raise ValueError(f"a row has fewer than {n} items left once the target and `exclude` are removed")
    return chosen


def _sample_by_rejection(
    n_items: int,
    targets: torch.Tensor,
    n: int,
    generator: torch.Generator,
    exclude: torch.Tensor | None,
    max_rounds: int = 1000,
) -> torch.Tensor:
    """Large catalogues: draw, then redraw only the forbidden or duplicate entries until none are left.

    The process treats every allowed item alike, so each row ends as a uniform S-subset, and it never
    allocates anything [B, N]-sized.
    """
    batch = targets.shape[0]
    device = targets.device
    rows = torch.arange(batch, device=device)[:, None]  # [B, 1]
    forbidden = None  # sorted codes row * N + item of the excluded items
    if exclude is not None and exclude.numel():
        per_row = exclude.expand(batch, -1) if exclude.dim() == 1 else exclude
        forbidden = (rows * n_items + per_row).flatten().unique()
    out = torch.randint(FIRST_ITEM, n_items, (batch, n), generator=generator, device=device)
    for _ in range(max_rounds):
        bad = out == targets[:, None]
        if forbidden is not None:
            bad |= torch.isin(rows * n_items + out, forbidden)
        ordered, order = out.sort(dim=1, stable=True)
        repeat = torch.zeros_like(bad)
        repeat.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])  # later copies of an item
        bad |= repeat
        n_bad = int(bad.sum())
        if n_bad == 0:
            return out
        out[bad] = torch.randint(FIRST_ITEM, n_items, (n_bad,), generator=generator, device=device)
    raise ValueError(f"could not draw {n} distinct allowed negatives per row; is `exclude` most of the catalogue?")


def per_example_ndcg(ranks: torch.Tensor, k: int = 10) -> torch.Tensor:
    """NDCG@k of each row from its 0-based rank (one relevant item): ``1 / log2(rank + 2)`` inside the top k,
    else 0. float64 [B] on the CPU; the mean over rows is :class:`RankingMetrics`' ``ndcg@k``."""
    r = ranks.detach().to("cpu", torch.float64)
    return torch.where(r < k, 1.0 / torch.log2(r + 2.0), 0.0)


@dataclass
class RankingMetrics:
    """Accumulates 0-based ranks over batches and reports HR@k, NDCG@k and MRR (one relevant item per row).

    HR@k = mean(rank < k); NDCG@k = mean(1 / log2(rank + 2) if rank < k else 0); MRR = mean(1 / (rank + 1))
    over the full ranking (no cut-off). Sums are kept in float64 so millions of rows add up exactly enough.

    Example::

        >>> m = RankingMetrics()
        >>> m.update(torch.tensor([0, 3, 50]))
        >>> m.compute()["hr@5"]  # 2 of 3 ranks are < 5
        0.6666666666666666
    """

    ks: tuple[int, ...] = (5, 10, 20)
    ndcg_ks: tuple[int, ...] = (10, 20)
    n: int = field(default=0, init=False)
    _hits: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _ndcg: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _rr: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if any(k <= 0 for k in (*self.ks, *self.ndcg_ks)):
            raise ValueError(f"cut-offs must be positive, got ks={self.ks} ndcg_ks={self.ndcg_ks}")
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.n = 0
        self._hits = dict.fromkeys(self.ks, 0.0)
        self._ndcg = dict.fromkeys(self.ndcg_ks, 0.0)
        self._rr = 0.0

    def update(self, ranks: torch.Tensor) -> None:
        """Add a batch of 0-based ranks, int [B] (from :func:`target_ranks` or :func:`sampled_ranks`)."""
        if ranks.dim() != 1 or ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
            raise ValueError(f"ranks must be an integer tensor [B], got {ranks.dtype} {tuple(ranks.shape)}")
        if ranks.numel() == 0:
            return
        if int(ranks.min()) < 0:
            raise ValueError("ranks are 0-based and cannot be negative")
        r = ranks.detach().to("cpu", torch.float64)
        for k in self.ks:
            self._hits[k] += float((r < k).sum())
        for k in self.ndcg_ks:
            self._ndcg[k] += float(per_example_ndcg(r, k).sum())
        self._rr += float((1.0 / (r + 1.0)).sum())
        self.n += int(ranks.numel())

    def compute(self) -> dict[str, float]:
        """``{"hr@k", "ndcg@k", "mrr", "n": rows}``; all zeros (and n = 0) when nothing was added."""
        denominator = max(self.n, 1)
        result: dict[str, float] = {f"hr@{k}": self._hits[k] / denominator for k in self.ks}
        result.update({f"ndcg@{k}": self._ndcg[k] / denominator for k in self.ndcg_ks})
        result["mrr"] = self._rr / denominator
        result["n"] = self.n
        return result

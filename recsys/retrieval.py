"""Exact top-k over a large item table without scoring every item: norm-ordered scan with early stop.

An edit changes only the query vector ``q = head(h)``; an item's score is ``q · t_i``. By Cauchy–Schwarz no item
scores above ``‖q‖ · ‖t_i‖``, so with the items sorted by ``‖t_i‖`` (largest first) a scan can stop as soon as the
next item's bound falls below the k-th best score found: every item after it scores lower. The answer is
exactly the full-catalogue top-k; only the work changes, and with it the memory traffic, which is what a
1M-item ranking is bound by on CPU (one full [D, N] pass per request). How early the scan stops depends on the
table: on random Gaussian targets (the benchmark's 1M catalogue) about a tenth is read; trained tables, whose
norms track popularity, usually stop earlier still.

    >>> index = NormOrderedIndex(targets)              # targets [N, D]; build once per model
    >>> idx, val = index.top_k(queries, k=10)           # queries [B, D] -> [B, k] item indices and scores
"""

from __future__ import annotations

from bisect import bisect_left

import torch
from torch import Tensor


class NormOrderedIndex:
    """Item targets sorted by norm, scanned in chunks until no remaining item can enter the top-k.

    Args:
        targets: [N, D] item target vectors (row i = item index i).
        excluded: item indices that must never rank (padding, unknown); left out of the index entirely.
        chunk: items scored per step: large enough to amortise a matmul call, small enough to stop early.
    """

    def __init__(self, targets: Tensor, excluded: tuple[int, ...] = (), chunk: int = 32_768) -> None:
        keep = torch.ones(targets.shape[0], dtype=torch.bool)
        keep[list(excluded)] = False
        ids = keep.nonzero().flatten()
        norms = targets[ids].norm(dim=1)
        order = torch.argsort(norms, descending=True, stable=True)
        self.ids = ids[order]  # position in the scan -> item index
        self.norms = norms[order].contiguous()
        self.table_t = targets[self.ids].T.contiguous()  # [D, N']: a chunk is a plain [B, D] x [D, c] product
        self.position = torch.full((targets.shape[0],), -1, dtype=torch.long)  # item index -> scan position
        self.position[self.ids] = torch.arange(len(self.ids))
        self.chunk = chunk

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @torch.inference_mode()
    def top_k(
        self, queries: Tensor, k: int, exclude: Tensor | None = None, bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The k best items of every query [B, D]: (item indices [B, k'], scores [B, k']), best first.

        ``exclude`` [B, H] lists item indices each row must skip (its history; any index outside the index,
        such as padding, is ignored). ``bias`` [B, N] (item index order, every entry >= 0: the prototypes' group
        bias) is added to the scores; the scan stays exact by adding each row's largest bias to its bound, so it
        stops later the larger the bias. ``k' = min(k, len(self))``; a row with fewer rankable items gets -inf
        scores at the end. Exactly what ``topk`` over ``queries @ targets.T (+ bias)`` with the exclusions masked
        returns, up to the order of exactly tied scores.
        """
        b, n = queries.shape[0], len(self)
        k = min(k, n)
        best_v = torch.full((b, k), float("-inf"))
        best_p = torch.zeros((b, k), dtype=torch.long)
        q_norm = queries.norm(dim=1)
        if bias is not None:
            if bool((bias < 0).any()):
                raise ValueError("the index's bias must be >= 0 (its bound assumes it)")
            bias_max = bias.amax(dim=1)
        else:
            bias_max = torch.zeros(b)
        # (scan position, row) of every exclusion, sorted by position: each chunk finds its own by bisection
        skip_pos: list[int] = []
        skip_row: list[int] = []
        if exclude is not None:
            skip = self.position[exclude]  # [B, H] scan positions, -1 = not in the index
            rows, cols = (skip >= 0).nonzero(as_tuple=True)
            at = skip[rows, cols]
            order = at.argsort()
            skip_pos, skip_row = at[order].tolist(), rows[order].tolist()
        for start in range(0, n, self.chunk):
            # Every item from here on has norm <= norms[start]: its score is at most ‖q‖·norms[start].
            if start and bool((q_norm * self.norms[start] + bias_max < best_v[:, -1]).all()):
                break
            stop = min(start + self.chunk, n)
            scores = queries @ self.table_t[:, start:stop]
            if bias is not None:
                scores += bias[:, self.ids[start:stop]]
            lo, hi = bisect_left(skip_pos, start), bisect_left(skip_pos, stop)
            if hi > lo:
                scores[skip_row[lo:hi], [p - start for p in skip_pos[lo:hi]]] = float("-inf")
            if start:
                # Only items above some row's k-th best can change anything: once the k best are good, that is a
                # handful of columns, and a top-k over them costs far less than one over the whole chunk.
                live = (scores > best_v[:, -1:]).any(dim=0).nonzero().flatten()
                if not len(live):
                    continue
                v, p = scores[:, live].topk(min(k, len(live)), dim=1)
                p = live[p]
            else:
                v, p = scores.topk(min(k, stop - start), dim=1)
            merged_v = torch.cat([best_v, v], dim=1)
            merged_p = torch.cat([best_p, p + start], dim=1)
            best_v, pick = merged_v.topk(k, dim=1)
            best_p = merged_p.gather(1, pick)
        return self.ids[best_p], best_v

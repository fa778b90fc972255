"""The demo's example sessions: what Persona and the base model recommend to real sessions of the replay.

Three sessions are picked deterministically (:func:`pick_sessions`). For each, its state just before its last
event (the items it had chosen until then) is ranked twice: by Persona through the running API (a stateless
request, so the adapter edits the model for exactly that history; the API's prototype bank is the one the
consumer refined during the replay) and by the base model without an edit, in this process. Both leave out the
items already seen, as the API does by default. The item the session actually chose next is then looked up in
both rankings: that is one prequential prediction of the kind the online HR@10 counts, shown item by item.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import polars as pl

from recsys.errors import PersonaError

if TYPE_CHECKING:
    from recsys.online import OnlineModel

#: A session needs at least this many replayed events (on catalogue items) to be an example.
MIN_EVENTS = 6
#: How many of each ranking the summary shows, and how many of its last items.
TOP = 5
LAST = 3
#: The API returns at most this many items (serving.schemas.MAX_K): a choice ranked lower shows as ">1000".
API_MAX_K = 1000


@dataclass(frozen=True)
class SessionExample:
    """One session just before its last event, and the two rankings it got then."""

    session_id: str
    history: list[str]  # catalogue items chosen before the last event, oldest first
    target: str  # the item of the last event
    persona: list[str]  # Persona's ranking, best first (the API's, up to API_MAX_K items)
    base: list[str]  # the base model's ranking, best first (the whole catalogue)

    def rank(self, ranking: Sequence[str]) -> int | None:
        """1-based rank of the item chosen next; None when the ranking does not hold it."""
        try:
            return ranking.index(self.target) + 1
        except ValueError:
            return None


def replayed_frame(df: pl.DataFrame, start_fraction: float, limit: int | None = None) -> pl.DataFrame:
    """The events a replay of ``df`` sends, in its order (:mod:`streaming.replay`: by time, ties in file order)."""
    ordered = df.with_row_index("__row").sort(["ts", "__row"]).drop("__row")
    return ordered.slice(int(ordered.height * start_fraction), limit)


def pick_sessions(
    replayed: pl.DataFrame, catalogue: Collection[str], n: int = 3, min_events: int = MIN_EVENTS
) -> list[tuple[str, list[str], str]]:
    """``n`` sessions of a replay as (session id, items before the last event, last item).

    ``replayed`` holds the events in the order they were sent (``user_id`` is the session). Candidates: sessions
    with at least ``min_events`` events on items the model knows (``catalogue``; the consumer skips the others),
    whose last item is new to them (a re-chosen item is left out of rankings). They are sorted by id (numerically
    when ids are numbers) and the first, the middle and the last are taken (evenly spaced for other ``n``): a
    fixed rule, not a search for flattering examples.
    """
    frame = replayed.filter(pl.col("item_id").is_in(pl.Series(list(catalogue), dtype=pl.String)))
    grouped = frame.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    candidates = []
    for session, items in grouped.iter_rows():
        if len(items) >= min_events and items[-1] not in items[:-1]:
            candidates.append((session, list(items[:-1]), items[-1]))
    candidates.sort(key=lambda c: (0, int(c[0]), "") if c[0].isdigit() else (1, 0, c[0]))
    if len(candidates) <= n:
        return candidates
    step = (len(candidates) - 1) / max(n - 1, 1)
    return [candidates[round(i * step)] for i in range(n)]


def persona_ranking(client: httpx.Client, history: Sequence[str]) -> list[str]:
    """Persona's ranking of a history through the API (stateless: the adapter runs on exactly these items)."""
    r = client.post("/v1/recommendations", json={"recent_items": list(history), "k": API_MAX_K})
    if r.status_code != 200:
        raise PersonaError(f"ranking request failed: HTTP {r.status_code} {r.text[:200]}")
    return [item["item_id"] for item in r.json()["items"]]


def base_ranking(online: OnlineModel, history: Sequence[str]) -> list[str]:
    """The base model's ranking of the whole catalogue for a history, its seen items left out (as the API does)."""
    import torch

    with torch.inference_mode():
        scores = online.scores(online.histories([list(history)]))[0]
        scores[online.indices_of(history)] = float("-inf")
        order = torch.argsort(scores, descending=True)
        order = order[torch.isfinite(scores[order])]
    return online.decode(order)


def session_examples(
    api: httpx.Client, online: OnlineModel, replayed: pl.DataFrame, n: int = 3
) -> list[SessionExample]:
    """Pick ``n`` sessions of the replay and rank each just before its last event (see the module docstring).

    ``api`` is a client of the running API (``base_url`` set); ``online`` the model it serves.
    """
    out = []
    for session, before, target in pick_sessions(replayed, online.vocab.ids, n):
        history = before[-online.cfg.max_len :]  # what the model reads of it, in the API and here alike
        persona, base = persona_ranking(api, history), base_ranking(online, history)
        out.append(SessionExample(session, before, target, persona, base))
    return out


def item_labels(online: OnlineModel) -> Callable[[str], str]:
    """Item id → "Title (year)" from the bundle's item metadata; "item <id>" where there is none."""

    def label(item: str) -> str:
        fields = ("year",) if online.items is not None and "year" in online.items.columns else ()
        described = online.describe([item], fields)[0]
        title = described.get("title")
        if not title:
            return f"item {item}"
        year = described.get("year")
        return f"{title} ({year})" if year else str(title)

    return label


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _rank_text(rank: int | None, ranked: int) -> str:
    return f"rank {rank}" if rank is not None else f"not in its top {ranked}"


def format_sessions(examples: Sequence[SessionExample], label: Callable[[str], str], width: int = 36) -> list[str]:
    """The summary's sessions section as plain lines (the terminal and the report print the same text).

    Per session: its last items, Persona's and the base model's top :data:`TOP` side by side (``*`` marks the
    item the session chose next), and that item's rank in each full ranking.
    """
    lines = [
        f"{len(examples)} sessions of the replay, just before their last event "
        f"(top {TOP}, seen items left out; * = the item chosen next):"
    ]
    for ex in examples:
        last = " · ".join(_fit(label(i), 30) for i in ex.history[-LAST:])
        lines += ["", f"session {ex.session_id} ({len(ex.history)} items before) · last: {last}"]
        lines.append(f"   #    {'Persona':<{width + 2}}base")
        for n in range(TOP):
            cells = []
            for ranking in (ex.persona, ex.base):
                item = ranking[n] if n < len(ranking) else None
                mark = "*" if item == ex.target else " "
                cells.append(f"{mark} {_fit(label(item), width):<{width}}" if item is not None else " " * (width + 2))
            lines.append(f"  {n + 1:>2}  {cells[0]}{cells[1]}".rstrip())
        lines.append(
            f"  next: {label(ex.target)}: Persona {_rank_text(ex.rank(ex.persona), len(ex.persona))}"
            f" · base {_rank_text(ex.rank(ex.base), len(ex.base))}"
        )
    return lines

"""The session's whole history as compact item counts, and the device model's repeat part (RepeatNet-like).

Where people choose the same items again, the strongest simple signal is how often and how recently the session
chose each item, over its WHOLE history, not only the encoder's window. A session keeps at most ``size`` entries
``(item, count, last)`` (``last`` = the index of its latest occurrence among the session's events); a new item
always gets in, evicting the entry with the fewest occurrences, the oldest among equals (most frequent and most
recent items are kept). Offline (:func:`repeat_features`) and online (:class:`RepeatCounts`, stored with the
session row) run this same rule, so both see the same entries.

Each entry also keeps decayed counts ``Σ_occurrences γ^(age − 1)`` for a short and a long memory (γ in
:data:`DECAYS`): how often AND how lately, which count and latest age alone cannot tell apart (an item chosen 3 times
long ago and once just now against one chosen 4 times in a row). They are updated exactly at each occurrence and
read lazily, so an entry costs O(1) per event.

The model reads ``(item, count, age, decayed_short, decayed_long)`` rows, float32 [B, R, ENTRY_WIDTH] (age = events
since the latest occurrence, 1 = the previous event; item 0 = an empty entry; item codes are exact below 2^24),
in the order the entries entered the session's counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from itertools import count as positions
from json import dumps as json_dumps
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from struct import Struct
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPEAT_SIZE = 64  # entries a session keeps (the default of ``persona train``)
DECAYS = (0.8, 0.97)  # the decayed counts' memories: about 5 and 33 events
_SHORT, _LONG = DECAYS
ENTRY_WIDTH = 3 + len(DECAYS)
PAD, UNK = 0, 1  # as recsys.model
#: Up to this many items the repeat part takes its logits from dense products with the whole catalogue (cheaper
#: than gathering each entry's item vector; a full matrix product of 4,000 items still was).
DENSE_ITEMS = 4096

K = TypeVar("K")
_ENTRY = Struct("=5d")  # an entry's vocabulary code, count, last, decayed short, decayed long
_PACK = _ENTRY.pack
ENTRY_BYTES = _ENTRY.size
_ENTRY_OF = itemgetter(1)  # a table item's entry (count, last, decayed short, decayed long)


class StoredCounts(dict[str, Any]):
    """:meth:`RepeatCounts.to_json`: the stored form as a plain dict, plus ``json_text`` (exactly ``json.dumps`` of
    it, which the store writes as it is: encoding every written session's entries was a third of the repeat part's
    ingestion cost) and the counts it was taken from (:meth:`RepeatCounts.from_json` picks them up again while they
    have not moved on, instead of rebuilding them entry by entry)."""

    __slots__ = ("json_text", "source")

    def __init__(self, n: int, items: list[Any], json_text: str, source: RepeatCounts[Any] | None = None) -> None:
        super().__init__(n=n, items=items)
        self.json_text = json_text
        self.source = source


def _key_text(key: Any) -> str:
    """A key as ``json.dumps`` writes it."""
    return encode_basestring_ascii(key) if type(key) is str else json_dumps(key)


class RepeatCounts(Generic[K]):
    """One session's bounded item counts: ``add`` each event in order, read :meth:`entries` or :meth:`encode`.

    Keys are whatever identifies an item (ids online, integer codes offline); ``n`` counts every event added. Each
    entry is ``(count, last, decayed_short, decayed_long)`` (decayed as of its latest occurrence). Entries keep the
    order they entered in (a dict's), through :meth:`to_json` and :meth:`from_json` too, so offline and online read
    them in the same order and the model's sums over them agree to the bit.

    Entries are tuples, replaced on update, and :meth:`to_json` writes tuples too: a tuple of numbers and strings
    leaves the garbage collector's lists after its first pass, while the consumer keeps thousands of sessions' counts
    alive, and as lists they made every full collection walk them (measured: GC was most of the part's ingestion
    cost; docs/performance.md).

    The consumer keeps a session's counts from batch to batch (:class:`StoredCounts`), and between two batches most
    of their entries do not change; so, once asked for, each entry's stored row and JSON text (:meth:`to_json`) and
    its packed numbers (:meth:`packed_entries`, for :class:`CountsSnapshots`) are kept, in the table's order, and
    redone only for the entries that changed. Counts read once (a ranking) never build them.
    """

    __slots__ = ("_codes", "_packed", "_rows", "_slots", "_stale", "_texts", "n", "size", "table")

    def __init__(self, size: int = REPEAT_SIZE) -> None:
        self.size = size
        self.table: dict[K, tuple[int, int, float, float]] = {}
        self.n = 0
        # built on first use (None before): the stored row and JSON text per entry (a changed entry's are None
        # until to_json, which redoes the ones listed in _stale); each entry's four numbers as float64 bytes
        self._rows: dict[K, tuple[Any, ...] | None] | None = None
        self._texts: dict[K, str | None] | None = None
        self._stale: list[K] = []
        # the entries' packed numbers in the table's order, ENTRY_BYTES each, and each key's position there: a
        # snapshot is one copy of it (a join of 64 entries' bytes cost six times as much)
        self._packed: bytearray | None = None
        self._slots: dict[K, int] | None = None
        self._codes: Mapping[K, int] | None = None  # the vocabulary _packed's codes come from

    def add(self, item: K) -> None:
        table, rows, texts, packed, slots = self.table, self._rows, self._texts, self._packed, self._slots
        entry = table.get(item)
        if entry is None:
            if len(table) >= self.size:
                # fewest occurrences first, then the oldest latest occurrence: the most frequent and recent stay
                # (entries compare as (count, last, ...) and no two share a ``last``: a C-level min over them)
                evicted = min(table.items(), key=_ENTRY_OF)[0]
                del table[evicted]
                if rows is not None and texts is not None:
                    del rows[evicted], texts[evicted]
                if packed is not None and slots is not None:
                    at = slots[evicted] * ENTRY_BYTES
                    del packed[at : at + ENTRY_BYTES]
                    self._slots = slots = dict(zip(table, positions()))  # the later entries moved up
            entry = table[item] = (1, self.n, 1.0, 1.0)
            if packed is not None and slots is not None:
                slots[item] = len(slots)
                packed += _PACK(self._codes[item], *entry)  # type: ignore[index]
        else:
            count, last, short, long = entry
            gap = self.n - last
            entry = table[item] = (count + 1, self.n, short * _SHORT**gap + 1.0, long * _LONG**gap + 1.0)
            if packed is not None and slots is not None:
                at = slots[item] * ENTRY_BYTES
                packed[at : at + ENTRY_BYTES] = _PACK(self._codes[item], *entry)  # type: ignore[index]
        # a new key goes last in every dict, an old one keeps its place: their orders stay the table's
        if rows is not None and texts is not None:
            rows[item] = texts[item] = None
            self._stale.append(item)
        self.n += 1

    def entries(self) -> list[tuple[K, int, int, list[float]]]:
        """``(item, count, age, decayed)`` per entry; age = events since its latest occurrence, decayed =
        ``Σ_occurrences γ^(age − 1)`` per γ of :data:`DECAYS`."""
        n = self.n
        out = []
        for k, (count, last, short, long) in self.table.items():
            age = n - last
            out.append((k, count, age, [short * _SHORT ** (age - 1), long * _LONG ** (age - 1)]))
        return out

    def packed_entries(self, codes: Mapping[K, int]) -> bytes:
        """The entries' ``(code, count, last, decayed_short, decayed_long)`` as float64 bytes, in the table's order,
        with each item's vocabulary code from ``codes`` (looked up once per change of the entry, not per snapshot;
        ``codes`` must give every item a code, UNK for one it does not know)."""
        if self._packed is None or self._codes is not codes:
            self._codes = codes
            self._packed = bytearray(b"".join([_PACK(codes[k], *e) for k, e in self.table.items()]))
            self._slots = dict(zip(self.table, positions()))
        return bytes(self._packed)

    def encode(self, code_of: Callable[[K], int], size: int) -> np.ndarray:
        """The model's input [size, ENTRY_WIDTH] float32 (:func:`encode_entries` of :meth:`entries`, written
        directly: this runs once per ranking); ``code_of`` maps an item to its vocabulary code."""
        out = np.zeros((size, ENTRY_WIDTH), dtype=np.float32)
        table = self.table
        if not table:
            return out
        e = len(table)
        codes = np.fromiter(map(code_of, table), dtype=np.float64, count=e)
        values = np.fromiter(chain.from_iterable(table.values()), dtype=np.float64, count=4 * e).reshape(e, 4)
        if codes.min() <= UNK:
            keep = codes > UNK
            codes, values = codes[keep], values[keep]
        codes, values = codes[:size], values[:size]
        m = len(codes)
        age = self.n - values[:, 1]
        out[:m, 0] = codes
        out[:m, 1] = values[:, 0]
        out[:m, 2] = age
        out[:m, 3] = values[:, 2] * np.power(_SHORT, age - 1.0)
        out[:m, 4] = values[:, 3] * np.power(_LONG, age - 1.0)
        return out

    def to_json(self) -> StoredCounts:
        """The stored form: ``{"n": events, "items": [[item, count, last, decayed_short, decayed_long], ...]}`` (rows
        as tuples in memory, arrays in JSON), with its JSON text (:class:`StoredCounts`)."""
        table, rows, texts = self.table, self._rows, self._texts
        if rows is None or texts is None:
            rows, texts = self._rows, self._texts = dict.fromkeys(table), dict.fromkeys(table)
            self._stale = list(table)
        for k in self._stale:
            if rows.get(k, 0) is None:  # changed since the last call, and still kept
                row = rows[k] = (k, *table[k])
                _, count, last, short, long = row
                if count == 1 and short == long == 1.0:  # a new entry (most changes): no float to format
                    texts[k] = f"[{_key_text(k)}, 1, {last}, 1.0, 1.0]"
                else:
                    texts[k] = f"[{_key_text(k)}, {count}, {last}, {short!r}, {long!r}]"
        self._stale.clear()
        text = f'{{"n": {self.n}, "items": [{", ".join(texts.values())}]}}'  # type: ignore[arg-type]
        return StoredCounts(self.n, list(rows.values()), text, self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, size: int = REPEAT_SIZE) -> RepeatCounts[Any]:
        source = getattr(data, "source", None)
        if source is not None and source.n == data["n"] and source.size == size:  # type: ignore[index]
            return source  # the counts it was taken from, as they were then
        out: RepeatCounts[Any] = cls(size)
        if data:
            out.n = int(data.get("n", 0))
            table = out.table
            for item, count, last, short, long in data.get("items", [])[:size]:
                table[item] = (count, last, short, long)  # as to_json wrote them
        return out

    @classmethod
    def of(cls, items: Iterable[K], size: int = REPEAT_SIZE) -> RepeatCounts[K]:
        out: RepeatCounts[K] = cls(size)
        for item in items:
            out.add(item)
        return out


class CountsSnapshots(Generic[K]):
    """Many sessions' counts as they are at some moments, encoded together: what the consumer's prequential check
    needs (per prediction, its session's counts before the event).

    :meth:`take` keeps one copy of the entries' packed codes and numbers (:meth:`RepeatCounts.packed_entries`);
    :meth:`real_entries` and :meth:`encode` then unpack every snapshot's rows with one set of array operations,
    bit-identical to :meth:`RepeatCounts.encode` of each (numpy's per-call overhead was most of a per-snapshot
    encode, reading the numbers back out of tuples most of the rest, and looking each entry's code up again most of
    what was left).
    """

    __slots__ = ("blobs", "codes", "lengths", "ns")

    def __init__(self, codes: Mapping[K, int]) -> None:
        self.codes = codes  # every item's vocabulary code (UNK for one the model does not know)
        self.blobs: list[bytes] = []  # per snapshot, its entries' codes and numbers (RepeatCounts.packed_entries)
        self.lengths: list[int] = []
        self.ns: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, counts: RepeatCounts[K]) -> None:
        self.blobs.append(counts.packed_entries(self.codes))
        self.lengths.append(len(counts.table))
        self.ns.append(counts.n)

    def real_entries(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every snapshot's known entries, the first ``size`` of each, unpacked together: (snapshot [E], row among
        its snapshot's known entries [E], the entry as :meth:`RepeatCounts.encode` writes it [E, ENTRY_WIDTH]
        float32). One set of array operations for the whole batch."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        # [E, 5]: code, count, last, short, long
        values = np.frombuffer(b"".join(self.blobs), dtype=np.float64).reshape(-1, 5)
        codes = values[:, 0]
        keep = codes > UNK
        kept = np.cumsum(keep)
        before = np.concatenate(([0], kept))[np.cumsum(lengths) - lengths]  # kept entries before each snapshot
        pos = kept - 1 - np.repeat(before, lengths)  # an entry's row among its snapshot's known entries
        sel = keep & (pos < size)
        snap = np.repeat(np.arange(len(lengths)), lengths)[sel]
        pos, values = pos[sel], values[sel]
        age = np.repeat(np.asarray(self.ns, dtype=np.float64), lengths)[sel] - values[:, 2]
        rows = np.empty((len(values), ENTRY_WIDTH), dtype=np.float32)
        rows[:, 0] = values[:, 0]
        rows[:, 1] = values[:, 1]
        rows[:, 2] = age
        rows[:, 3] = values[:, 3] * np.power(_SHORT, age - 1.0)
        rows[:, 4] = values[:, 4] * np.power(_LONG, age - 1.0)
        return snap, pos, rows

    def encode(self, size: int) -> np.ndarray:
        """float32 [snapshots, size, ENTRY_WIDTH]: row i is :meth:`RepeatCounts.encode` of snapshot i."""
        out = np.zeros((len(self.lengths), size, ENTRY_WIDTH), dtype=np.float32)
        snap, pos, rows = self.real_entries(size)
        out[snap, pos] = rows
        return out


def encode_entries(entries: Sequence[tuple[int, int, int, list[float]]], size: int) -> np.ndarray:
    """``(code, count, age, decayed)`` entries → float32 [size, ENTRY_WIDTH], unknown items (code <= UNK) dropped,
    empty rows 0."""
    out = np.zeros((size, ENTRY_WIDTH), dtype=np.float32)
    j = 0
    for code, count, age, decayed in entries:
        if code > UNK and j < size:
            out[j] = (code, count, age, *decayed)
            j += 1
    return out


def repeat_features(codes: np.ndarray, starts: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """The counts each example's session holds before its target: float32 [M, size, ENTRY_WIDTH] (see
    :func:`encode_entries`).

    ``codes`` are vocabulary codes, per-user ordered as in :func:`recsys.splits.make_split`; ``pos`` [M] are example
    positions, ``starts`` [M] their user block's start. Items the vocabulary does not know (UNK) are not counted,
    as the live stream does not apply them to a session. One pass over each user's events (the rule of
    :class:`RepeatCounts`).
    """
    out = np.zeros((pos.size, size, ENTRY_WIDTH), dtype=np.float32)
    by_start: dict[int, list[int]] = {}
    for j, s in enumerate(starts.tolist()):
        by_start.setdefault(s, []).append(j)
    for start, rows in by_start.items():
        rows.sort(key=lambda j: int(pos[j]))
        state: RepeatCounts[int] = RepeatCounts(size)
        at = start
        for j in rows:
            p = int(pos[j])
            while at < p:
                code = int(codes[at])
                if code > UNK:
                    state.add(code)
                at += 1
            out[j] = state.encode(int, size)
    return out


def entries_tensor(rows: Sequence[np.ndarray]) -> Tensor:
    """Stacked per-session entries [B, R, ENTRY_WIDTH] (float32) for the model."""
    return torch.from_numpy(np.stack(rows))


#: The repeat part's forms (:class:`RepeatPart`, ``ModelConfig.repeat_form``). ``"additive"``: the first one, an
#: unnormalised gate and a repeat distribution learned from scratch (bundles trained before the field load with it);
#: ``"mixture"``: a probability-space mixture whose repeat distribution starts as the short decayed count;
#: ``"mixture-attention"``: the same plus the attention term of the first form.
ADDITIVE, MIXTURE, MIXTURE_ATTENTION = "additive", "mixture", "mixture-attention"
FORMS = (ADDITIVE, MIXTURE, MIXTURE_ATTENTION)
DEFAULT_FORM = MIXTURE_ATTENTION  # chosen on validation (docs/results.md, "A probability-space mixture")
#: The mixture forms' initial p(repeat) (the gate's bias is its logit).
INITIAL_REPEAT = 0.6
#: Decayed counts are floored here before their log (an entry last seen ~400 events ago underflows float32's 0.8^age).
TINY = 1e-30
#: The repeat logit of an empty entry: its softmax weight underflows to exactly 0.
EMPTY_LOGIT = -1e4
#: Items per product when the catalogue's logsumexp is computed without the caller's logits (an index's catalogue).
LSE_CHUNK = 65536


def catalogue_logsumexp(x: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """``log Σ_i exp(<x, t(E_i)>)`` over every item [B, 1], exactly, in chunks of ``chunk`` items (default
    :data:`LSE_CHUNK`): a full scan of the catalogue (what the mixture forms' gate needs where no caller has the full
    logits: the index path)."""
    chunk = chunk or LSE_CHUNK
    out: Tensor | None = None
    for i in range(0, targets.shape[0], chunk):
        part = torch.logsumexp(x @ targets[i : i + chunk].T, 1, keepdim=True)
        out = part if out is None else torch.logaddexp(out, part)
    assert out is not None
    return out


class RepeatPart(nn.Module):
    """Repeat or explore, as a mixture (RepeatNet, AAAI 2019), in an additive form that keeps ranking cheap.

    With the edited head output ``x`` [B, D] (so an edit moves it), the explore logits ``s_i = <x, t(E_i)>`` and
    the session's entries j = (item i_j, count, age, decayed counts d_short, d_long):

    - repeat distribution over the session's items ``log P_r(j) = log_softmax_j(z_j)``;
    - a gate ``g = w·[x, log1p(#entries), log1p(Σ count)] + b`` and ``ρ`` from it;
    - item i's score ``log(exp(s_i) + exp(ρ + log P_r(i)))``: a mixture of the explore softmax and the repeat
      distribution, up to a per-session constant.

    That score is ``s_i + softplus(ρ + log P_r(i) − s_i)`` for the session's items and ``s_i`` for every other item:
    a bias on at most R items, added like the group bias (full scan or index). The forms (:data:`FORMS`):

    - ``"additive"`` (the first form): ``z_j = <W_q x, t(E_ij)>/√D + f(φ_j)``, f a small MLP of log1p(count),
      log(age), 1/age, the count's share and the raw decayed counts; ``ρ = g``, so
      ``p(repeat) = e^ρ / (e^ρ + Σ_i e^{s_i})`` moves with the explore logits' scale;
    - ``"mixture"``: ``z_j = a·log d_short + b·log d_long + f(φ_j)``, φ with the decayed counts' logs too, a = 1,
      b = 0 and f's output 0 at initialisation (P_r starts as the short decayed count, normalised); ``ρ = g +
      logsumexp_i s_i``, so the scores are ``log((1 − p) softmax(s)_i + p P_r(i))`` + a per-row constant with
      ``p(repeat) = sigmoid(g)`` (initially :data:`INITIAL_REPEAT`);
    - ``"mixture-attention"``: ``"mixture"`` plus the attention term (initially 0).

    The mixture forms need the logsumexp over the whole catalogue: free where the caller has the logits (scoring,
    training, the device graph), a full scan in chunks otherwise (:func:`catalogue_logsumexp`: the index path).
    """

    def __init__(self, dim: int, form: str = ADDITIVE) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown repeat form {form!r}; known: {', '.join(FORMS)}")
        self.form = form
        self.mixture = form != ADDITIVE
        attention = form in (ADDITIVE, MIXTURE_ATTENTION)
        self.query = nn.Linear(dim, dim) if attention else None
        n_features = 4 + (2 if self.mixture else 1) * len(DECAYS)
        self.features = nn.Sequential(nn.Linear(n_features, 16), nn.Tanh(), nn.Linear(16, 1))
        self.gate = nn.Linear(dim + 2, 1)
        self.decay_weight = nn.Parameter(torch.tensor([1.0, 0.0])) if self.mixture else None
        with torch.no_grad():
            if not self.mixture:
                assert self.query is not None
                self.query.weight.mul_(0.1)
                self.gate.bias.fill_(0.0)
            else:
                if self.query is not None:
                    self.query.weight.zero_()
                    self.query.bias.zero_()
                last = self.features[2]
                assert isinstance(last, nn.Linear)
                last.weight.zero_()
                last.bias.zero_()
                self.gate.weight.zero_()
                self.gate.bias.fill_(math.log(INITIAL_REPEAT / (1.0 - INITIAL_REPEAT)))

    def entry_logits(self, entries: Tensor) -> Tensor:
        """The repeat logits' terms that read the entries alone [..., R] (the features' MLP, and the mixture forms'
        decayed-count term): the same for every head output, so for the edited and the base model alike."""
        total = entries[..., 1].sum(-1, keepdim=True)
        count = entries[..., 1]
        age = entries[..., 2].clamp(min=1.0)
        decayed = entries[..., 3 : 3 + len(DECAYS)]
        phi = [torch.stack([torch.log1p(count), torch.log(age), 1.0 / age, count / total.clamp(min=1.0)], -1), decayed]
        if not self.mixture:
            return self.features(torch.cat(phi, -1)).squeeze(-1)
        assert self.decay_weight is not None
        log_decayed = torch.log(decayed.clamp(min=TINY))
        learned = self.features(torch.cat([*phi, log_decayed], -1)).squeeze(-1)
        return (log_decayed * self.decay_weight).sum(-1) + learned

    def forward(
        self, x: Tensor, targets: Tensor, entries: Tensor, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(items [B, R], bias [B, R]) for head outputs x [B, D], item targets t(E) [N, D], entries [B, R, W];
        ``logits`` [B, N]: the explore logits ``x t(E)^T`` when the caller has them already (scoring does).

        Empty entries (item 0) get bias 0, so adding the bias at item 0 (padding) changes nothing ranked.
        """
        items, real, s, log_p, rho = self.parts(x, targets, entries, logits)
        bias = F.softplus(rho + log_p - s)
        return items, torch.where(real, bias, torch.zeros_like(bias))

    def parts(
        self, x: Tensor, targets: Tensor, entries: Tensor, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(items [B, R], real [B, R], the items' explore logits s [B, R], log P_r [B, R], ρ [B, 1]) of
        :meth:`forward` (``log P_r`` is about −1e4 at empty entries)."""
        items = entries[..., 0].long()
        count = entries[..., 1].to(x.dtype)
        real = items > UNK
        q = None if self.query is None else self.query(x)
        scale = math.sqrt(x.shape[-1])
        att: Tensor | None = None
        lse: Tensor | None = None
        if targets.shape[0] <= DENSE_ITEMS:
            # the explore and attention logits of every item, then the session's: two dense products and gathers
            # cost less than gathering R item vectors per row (measured: 1.3 against 10.9 µs a row, N = 551)
            full = x @ targets.T if logits is None else logits
            s = full.gather(1, items)
            if q is not None:
                att = (q @ targets.T).gather(1, items) / scale
            if self.mixture:
                lse = torch.logsumexp(full, 1, keepdim=True)
        else:
            t = F.embedding(items, targets)  # [B, R, D]
            if q is None:
                s = torch.bmm(t, x.unsqueeze(2)).squeeze(2)
            else:
                both = torch.bmm(t, torch.stack([x, q], 2))  # both logits in one pass over t: [B, R, 2]
                s = both[..., 0]
                att = both[..., 1] / scale
            if self.mixture:
                lse = catalogue_logsumexp(x, targets) if logits is None else torch.logsumexp(logits, 1, keepdim=True)
        total = count.sum(1, keepdim=True)
        z = self.entry_logits(entries)
        if att is not None:
            z = z + att
        log_p = torch.log_softmax(z.masked_fill(~real, EMPTY_LOGIT), 1)
        summary = torch.cat([x, torch.log1p(real.sum(1, keepdim=True).to(x.dtype)), torch.log1p(total)], 1)
        rho = self.gate(summary)  # [B, 1]
        if lse is not None:
            rho = rho + lse
        return items, real, s, log_p, rho


def add_repeat_bias(scores: Tensor, items: Tensor, bias: Tensor) -> Tensor:
    """``scores`` [B, N] with each session's repeat bias added at its items (out of place)."""
    return scores.scatter_add(1, items, bias)

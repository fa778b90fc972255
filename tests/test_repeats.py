"""The repeat part: whole-history item counts (offline and online by one rule), the repeat/explore mixture, its
training decision, and the same scores offline, in the consumer's prequential check and in the API's rankings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from persona.events import Event
from persona.ingest import Ingestor
from persona.models import ModelProvider
from persona.store import Store
from recsys.baselines import FinetuneMethod, SessionRepeatMethod
from recsys.evaluate import BaseMethod, evaluate_method, score_batch
from recsys.metrics import target_ranks
from recsys.model import ModelConfig, PersonaModel
from recsys.online import OnlineModel
from recsys.repeat_rows import RepeatRows
from recsys.repeats import (
    DECAYS,
    ENTRY_WIDTH,
    FORMS,
    INITIAL_REPEAT,
    CountsSnapshots,
    RepeatCounts,
    RepeatPart,
    catalogue_logsumexp,
    encode_entries,
    repeat_features,
)
from recsys.splits import make_split
from recsys.synthetic import SyntheticConfig, generate
from recsys.train import TrainConfig, train_repeat_part
from serving.ranking import Ranker, RankQuery

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_counts_keep_the_most_frequent_then_the_most_recent_items() -> None:
    counts: RepeatCounts[str] = RepeatCounts.of(["a", "b", "a", "c", "d"], size=3)
    # full at "d": b, c have one occurrence each, b's is older -> b leaves; a (2) stays
    assert [e[:3] for e in counts.entries()] == [("a", 2, 3), ("c", 1, 2), ("d", 1, 1)]  # in the order they entered
    # decayed counts: a at ages 3 and 5 -> γ^2 + γ^4 per γ
    assert counts.entries()[0][3] == pytest.approx([g**2 + g**4 for g in DECAYS])
    assert counts.entries()[1][3] == pytest.approx([g**1 for g in DECAYS])
    counts.add("b")  # c (1, older than d) leaves
    assert [e[0] for e in counts.entries()] == ["a", "d", "b"]
    assert counts.n == 6
    back = RepeatCounts.from_json(json.loads(counts.to_json().json_text), size=3)  # as stored: same order, bits
    assert back.entries() == counts.entries()
    back.add("a")
    counts.add("a")
    code_of = {"a": 5, "b": 6, "d": 7}.__getitem__
    encoded = counts.encode(code_of, 4)
    np.testing.assert_array_equal(back.encode(code_of, 4), encoded)
    np.testing.assert_array_equal(encoded, encode_entries([(code_of(k), *rest) for k, *rest in counts.entries()], 4))
    assert encoded[3].tolist() == [0.0] * ENTRY_WIDTH and encoded[0, :3].tolist() == [5.0, 3.0, 1.0]


def test_offline_counts_follow_the_online_rule_over_the_whole_history() -> None:
    df = generate(SyntheticConfig(users=30, items=40, events=1500, repeat=0.6, seed=1))
    split = make_split(df, max_len=5, repeat_size=6)
    assert split.test.repeats is not None and split.test.repeats.shape[1:] == (6, ENTRY_WIDTH)
    # rebuild each user's code sequence and check a few examples against a fresh RepeatCounts of its whole prefix
    ordered = df.sort("ts", maintain_order=True)
    codes = split.vocab.encode(ordered.get_column("item_id").cast(str))
    users = ordered.get_column("user_id").cast(str).to_list()
    per_user: dict[str, list[int]] = {}
    checked = 0
    for ex in range(0, len(split.test), 97):
        user = split.user_ids[int(split.test.users[ex])]
        seq = per_user.setdefault(user, [int(c) for c, u in zip(codes, users, strict=True) if u == user])
        ts = split.test.ts[ex]
        before = int((ordered.filter(ordered.get_column("user_id").cast(str) == user).get_column("ts") < ts).sum())
        expected = encode_entries(RepeatCounts.of([c for c in seq[:before] if c > 1], 6).entries(), 6)
        np.testing.assert_array_equal(split.test.repeats[ex], expected)
        checked += 1
    assert checked >= 5
    # the window alone sees less than the counts: some targets are in the counts but not in the 5-item window
    in_counts = (split.test.repeats[:, :, 0] == split.test.targets[:, None]).any(1)
    in_window = (split.test.histories == split.test.targets[:, None]).any(1)
    assert (in_counts & ~in_window).any()


def _entries(rows: list[list[tuple[int, int, int]]], size: int) -> torch.Tensor:
    """Model input [B, size, W] of (code, count, age) entries (decayed counts as if the occurrences were in a row)."""
    out = np.zeros((len(rows), size, ENTRY_WIDTH), dtype=np.float32)
    for b, row in enumerate(rows):
        out[b] = encode_entries(
            [(c, n, a, [sum(g ** (a - 1 + k) for k in range(n)) for g in DECAYS]) for c, n, a in row], size
        )
    return torch.from_numpy(out)


def _model(repeat_size: int = 4, form: str = "mixture") -> PersonaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=30, dim=16, code_dim=8, max_len=6, repeat_size=repeat_size, repeat_form=form)
    model = PersonaModel(cfg)
    part = model.device_model.repeat
    assert part is not None
    with torch.no_grad():
        part.gate.bias.fill_(3.0)
        if part.mixture:  # away from the initialisation: P_r is not the decayed count alone, the gate reads x
            _perturb(part)
    return model.eval()


def _perturb(part: RepeatPart) -> None:
    with torch.no_grad():
        for p in part.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def test_the_finetune_baseline_reads_the_repeat_part_like_the_base_model() -> None:
    """Fine-tuning is compared like for like: with the sessions' counts it scores through the repeat part, so a step
    of 0 is exactly the base model with its part (without them it would rank like base-no-repeat)."""
    model = _model()
    hist = torch.tensor([[0, 0, 5, 7, 5, 9], [0, 0, 0, 3, 4, 3]])
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2)]], 4)
    with torch.inference_mode():
        base = score_batch(BaseMethod(model), hist, reps)
        still = score_batch(FinetuneMethod(model, lr=0.0), hist, reps)
        moved = score_batch(FinetuneMethod(model, lr=0.5), hist, reps)
    torch.testing.assert_close(still, base, rtol=0, atol=1e-6)
    assert not torch.allclose(still, model.score(hist), atol=1e-3)  # the part moved the session's items
    assert not torch.allclose(moved, base, atol=1e-3)


@pytest.mark.parametrize("form", FORMS)
def test_the_mixture_moves_only_the_sessions_items_and_an_edit_moves_it(form: str) -> None:
    model = _model(form=form)
    hist = torch.tensor([[0, 0, 5, 7, 5, 9], [0, 0, 0, 3, 4, 3]])
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2)]], 4)
    with torch.inference_mode():
        plain = model.score(hist)
        mixed = model.score(hist, repeats=reps)
        x = model.device_model.head(model.device_model.encode(hist))
        targets = model.device_model.item_targets()
        rep = model.device_model.repeat
        assert rep is not None
        items, bias = rep(x, targets, reps)
    session_items = [{5, 7, 9}, {3, 4}]
    for row, own in enumerate(session_items):
        others = [i for i in range(30) if i not in own]
        torch.testing.assert_close(mixed[row, others], plain[row, others])  # exploring: the base scores
        for i in own:
            assert float(mixed[row, i]) > float(plain[row, i])  # log(e^s + e^(ρ + log P_r)) > s
    # the additive form is the mixture: log(e^s_i + e^(ρ + log P_r(i)))
    j = 0
    s = float(plain[0, int(items[0, j])])
    assert float(mixed[0, int(items[0, j])]) == pytest.approx(s + float(bias[0, j]), rel=1e-5)
    # no entries: exactly the model without the part
    torch.testing.assert_close(model.score(hist, repeats=torch.zeros_like(reps)), plain)
    # an edit of the head changes the state the gate and the repeat distribution read
    with torch.inference_mode():
        edit = model.adapter.edit_from_codes(torch.full((2, 2, 8), 0.9))
        edited_plain, edited = model.score(hist, edit), model.score(hist, edit, repeats=reps)
    assert not torch.allclose(edited - edited_plain, mixed - plain)


def test_snapshots_encode_like_each_sessions_counts() -> None:
    """The consumer encodes a batch's counts together (CountsSnapshots): bit-identical to encoding each snapshot
    alone, with unknown items left out, full tables, empty ones and more entries than the model reads."""
    import random

    rng = random.Random(0)
    codes = {str(i): (1 if i in (3, 7) else i + 2) for i in range(30)}  # "3", "7": unknown now
    code_of = codes.__getitem__
    for size in (3, 8, 64):
        snapshots: CountsSnapshots[str] = CountsSnapshots(codes)
        expected = []
        for _ in range(40):
            counts: RepeatCounts[str] = RepeatCounts(size)
            for _ in range(rng.randrange(0, 120)):
                counts.add(str(rng.randrange(30)))
                if rng.random() < 0.2:  # taken mid-way: later adds must not change what was taken
                    snapshots.take(counts)
                    expected.append(counts.encode(code_of, size))
            snapshots.take(counts)
            expected.append(counts.encode(code_of, size))
        got = snapshots.encode(size)
        assert len(snapshots) == len(expected)
        np.testing.assert_array_equal(got, np.stack(expected))
    # the codes come from the vocabulary the snapshots were taken for: another one (a reloaded model) re-codes them
    counts = RepeatCounts.of(["1", "2", "3"], 8)
    first: CountsSnapshots[str] = CountsSnapshots(codes)
    first.take(counts)
    other = {k: v + 100 for k, v in codes.items()}
    second: CountsSnapshots[str] = CountsSnapshots(other)
    second.take(counts)
    np.testing.assert_array_equal(first.encode(8)[0], counts.encode(code_of, 8))
    np.testing.assert_array_equal(second.encode(8)[0], counts.encode(other.__getitem__, 8))
    assert not np.array_equal(first.encode(8), second.encode(8))


def _dumped(counts: RepeatCounts[Any]) -> str:
    """What the stored form must be: ``json.dumps`` of the counts' rows, built from the table alone."""
    return json.dumps({"n": counts.n, "items": [[k, *e] for k, e in counts.table.items()]})


def test_the_stored_form_carries_its_exact_json_and_picks_its_counts_up_again() -> None:
    """to_json keeps each entry's text until the entry changes: its text must stay json.dumps of the counts' rows
    (built here from the table alone) and of the stored form through updates, evictions and re-entries;
    from_json takes the live counts back only while they have not moved on (a batch that failed after adding to them
    must rebuild from what was stored)."""
    import random

    rng = random.Random(1)
    ids = ["a", 'quo"te', "back\\slash", "ünï", "tab\t"] + [f"i{i}" for i in range(40)]
    for size in (1, 2, 5, 64):
        counts: RepeatCounts[str] = RepeatCounts(size)
        assert counts.to_json().json_text == _dumped(counts) == '{"n": 0, "items": []}'
        for _ in range(300):
            counts.add(rng.choice(ids))
            if rng.random() < 0.15:
                stored = counts.to_json()
                assert stored.json_text == _dumped(counts)
        stored = counts.to_json()
        assert stored.json_text == _dumped(counts) == json.dumps(stored)
        assert stored["n"] == counts.n and len(stored["items"]) == min(size, len(ids))
        assert RepeatCounts.from_json(stored, size) is counts
        assert RepeatCounts.from_json(stored, size + 1) is not counts  # another model's size: rebuilt
        counts.add("a")  # moved on: the stored form is rebuilt, as it was
        back = RepeatCounts.from_json(stored, size)
        assert back is not counts and back.n == stored["n"] and back.to_json().json_text == stored.json_text
        back.add("a")
        assert back.entries() == counts.entries()
    offline: RepeatCounts[int] = RepeatCounts.of([3, 4, 3])  # integer keys (offline) write JSON numbers
    assert offline.to_json().json_text == _dumped(offline)
    assert offline.to_json().json_text.startswith('{"n": 3, "items": [[3, 2, 2, ')


def test_the_stored_text_and_the_packed_entries_follow_the_same_evictions() -> None:
    """Snapshots' packed numbers are kept in place and renumbered on eviction, the stored text per entry: interleaving
    them through evictions must keep both equal to counts rebuilt from what was stored."""
    import random

    rng = random.Random(2)
    codes = {f"i{i}": i + 2 for i in range(30)}
    counts: RepeatCounts[str] = RepeatCounts(6)
    for step in range(400):
        counts.add(f"i{rng.randrange(30)}")
        if step % 3 == 0:
            counts.packed_entries(codes)
        if step % 5 == 0:
            assert counts.to_json().json_text == _dumped(counts)
    fresh = RepeatCounts.from_json(json.loads(counts.to_json().json_text), 6)
    assert counts.packed_entries(codes) == fresh.packed_entries(codes)
    assert counts.to_json().json_text == fresh.to_json().json_text == _dumped(counts)


@pytest.mark.parametrize("form", FORMS)
def test_the_dense_and_the_gathered_logits_agree(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """Small catalogues take the part's logits from dense products, large ones gather item vectors: same scores."""
    import recsys.repeats

    model = _model(form=form)
    hist = torch.tensor([[0, 0, 5, 7, 5, 9], [0, 0, 0, 3, 4, 3]])
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2)]], 4)
    with torch.inference_mode():
        dense = model.score(hist, repeats=reps)
        monkeypatch.setattr(recsys.repeats, "DENSE_ITEMS", 0)
        gathered = model.score(hist, repeats=reps)
    torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_a_few_rows_in_numpy_give_the_parts_scores(form: str) -> None:
    """Single rankings run the part in NumPy (RepeatRows): the same items and biases as the torch module, for rows
    with entries, a full table and none, in every form."""
    model = _model(repeat_size=4, form=form)
    part = model.device_model.repeat
    assert part is not None
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2), (5, 3, 4), (6, 1, 5)], []], 4)
    with torch.inference_mode():
        x = model.device_model.head(model.device_model.encode(torch.tensor([[0, 0, 5, 7, 5, 9]] * 3)))
        x = x + torch.randn(3, x.shape[1]) * 0.5
        targets = model.device_model.item_targets()
        logits = x @ targets.T
        items, bias = part(x, targets, reps, logits)
        rows = RepeatRows(part, targets)(x, reps, logits)
    assert torch.equal(rows[0], items)
    torch.testing.assert_close(rows[1], bias, rtol=1e-5, atol=1e-6)
    assert float(bias[0, :3].min()) > 0 and float(bias[1].min()) > 0 and float(rows[1][2].abs().max()) == 0.0


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_prepared_snapshots_score_like_the_part(form: str, dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer prepares a batch's count snapshots once (RepeatRows.prepare: NumPy, real entries only) and scores
    them under two head outputs (RepeatRows.score): the module's items and biases on the same snapshots encoded,
    for every form, with unknown items, truncated and empty tables, for any selection of rows, through the dense
    product or the gathered keys; empty entries get exactly 0."""
    import random

    import recsys.repeat_rows

    if not dense:
        monkeypatch.setattr(recsys.repeat_rows, "DENSE_ITEMS", 0)
    rng = random.Random(2)
    model = _model(repeat_size=8, form=form)
    part = model.device_model.repeat
    assert part is not None
    targets = model.device_model.item_targets()
    rows = RepeatRows(part, targets)
    codes = {str(i): (1 if i in (3, 7) else i + 2) for i in range(25)}
    snapshots: CountsSnapshots[str] = CountsSnapshots(codes)
    for _ in range(30):
        snapshots.take(RepeatCounts.of([str(rng.randrange(25)) for _ in range(rng.randrange(0, 40))], 12))
    plain = torch.from_numpy(snapshots.encode(8))
    empty = plain[..., 0] <= 1
    assert bool(empty.any()) and bool((~empty).any()) and bool(empty.all(1).any())  # an empty table among them
    prepared = rows.prepare(snapshots, 8)
    assert len(prepared) == 30 and len(prepared[2:9]) == 7
    assert torch.equal(prepared.items, plain[..., 0].long()) and torch.equal(prepared.empty, empty)
    with torch.inference_mode():
        x = torch.randn(30, 16)
        logits = x @ targets.T
        items, bias = part(x, targets, plain, logits)
        got_items, got = rows.score(x, prepared, logits)
        assert torch.equal(got_items, items)
        torch.testing.assert_close(got, bias, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[empty], torch.zeros(int(empty.sum())))
        pick = torch.tensor([29, 3, 3, 0, 17])
        _, picked = rows.score(x[pick], prepared[pick], logits[pick])
        torch.testing.assert_close(picked, bias[pick], rtol=1e-5, atol=1e-5)
        listed = prepared[pick.tolist()]  # a list of rows (the consumer's), converted once for the four tensors
        assert all(np.array_equal(a, b) for a, b in zip(listed.to_numpy(), prepared[pick].to_numpy(), strict=True))
        assert len(prepared[[]]) == 0
        # across a process boundary (the consumer's model process) the same
        _, again = rows.score(x, type(prepared).from_numpy(*prepared.to_numpy()), logits)
        assert torch.equal(again, got)
    none: CountsSnapshots[str] = CountsSnapshots(codes)
    assert len(rows.prepare(none, 8)) == 0


def test_a_model_without_the_part_ignores_counts_and_loads_old_configs() -> None:
    cfg = ModelConfig.from_stored({"n_items": 30, "dim": 16, "code_dim": 8, "max_len": 6})
    assert cfg.repeat_size == 0
    model = PersonaModel(cfg).eval()
    assert model.device_model.repeat is None
    assert not any(k.startswith("device_model.repeat") for k in model.state_dict())
    hist = torch.tensor([[0, 2, 5, 7, 5, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(model.score(hist, repeats=_entries([[(5, 2, 2)]], 1)), model.score(hist))


def _first_form(part: RepeatPart, x: torch.Tensor, targets: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """The first ("additive") form's bias [B, R] as it was written before the forms: a reference for old bundles."""
    assert part.query is not None
    items = entries[..., 0].long()
    count, age = entries[..., 1], entries[..., 2].clamp(min=1.0)
    real = items > 1
    s = (x @ targets.T).gather(1, items)
    att = (part.query(x) @ targets.T).gather(1, items) / x.shape[-1] ** 0.5
    total = count.sum(1, keepdim=True)
    share = count / total.clamp(min=1.0)
    phi = torch.cat([torch.stack([torch.log1p(count), torch.log(age), 1.0 / age, share], -1), entries[..., 3:]], -1)
    log_p = torch.log_softmax((att + part.features(phi).squeeze(-1)).masked_fill(~real, -1e4), 1)
    rho = part.gate(torch.cat([x, torch.log1p(real.sum(1, keepdim=True).float()), torch.log1p(total)], 1))
    bias = torch.nn.functional.softplus(rho + log_p - s)
    return torch.where(real, bias, torch.zeros_like(bias))


def _mixture(part: RepeatPart, x: torch.Tensor, targets: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """The mixture forms' distribution written out: ``(1 − p) softmax(s) + p P_r`` [B, N]."""
    assert part.decay_weight is not None
    items = entries[..., 0].long()
    count, age = entries[..., 1], entries[..., 2].clamp(min=1.0)
    real = items > 1
    decayed = entries[..., 3:]
    log_decayed = torch.log(decayed.clamp(min=1e-30))
    total = count.sum(1, keepdim=True)
    phi = torch.cat(
        [
            torch.stack([torch.log1p(count), torch.log(age), 1.0 / age, count / total.clamp(min=1.0)], -1),
            decayed,
            log_decayed,
        ],
        -1,
    )
    z = (log_decayed * part.decay_weight).sum(-1) + part.features(phi).squeeze(-1)
    if part.query is not None:
        z = z + (part.query(x) @ targets.T).gather(1, items) / x.shape[-1] ** 0.5
    p_entry = torch.softmax(z.masked_fill(~real, float("-inf")), 1).nan_to_num(0.0) * real
    p_r = torch.zeros(x.shape[0], targets.shape[0]).scatter_add(1, items, p_entry)
    p = torch.sigmoid(part.gate(torch.cat([x, torch.log1p(real.sum(1, keepdim=True).float()), torch.log1p(total)], 1)))
    return (1 - p) * torch.softmax(x @ targets.T, 1) + p * p_r


@pytest.mark.parametrize("form", ["mixture", "mixture-attention"])
@pytest.mark.parametrize("trained", [False, True])
def test_the_mixture_forms_rank_by_the_probability_mixture(form: str, trained: bool) -> None:
    """s_i + bias_i = log((1 − p) softmax(s)_i + p P_r(i)) + a per-row constant at every item; at initialisation
    p = INITIAL_REPEAT and P_r is the short decayed count, normalised."""
    torch.manual_seed(2)
    part = RepeatPart(16, form)
    if trained:
        _perturb(part)
    x, targets = torch.randn(3, 16), torch.randn(30, 16)
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 3, 3)], [(3, 2, 1), (4, 1, 2), (5, 3, 4), (6, 1, 5)], []], 4)
    with torch.inference_mode():
        logits = x @ targets.T
        scores = logits.scatter_add(1, *part(x, targets, reps, logits))
        mixture = _mixture(part, x, targets, reps)
    gap = torch.log(mixture) - scores
    torch.testing.assert_close(gap, gap[:, :1].expand_as(gap), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[2], logits[2])  # no entries: the explore scores
    if not trained:
        short = torch.zeros(3, 30).scatter_add(1, reps[..., 0].long(), reps[..., 3])
        expected = (1 - INITIAL_REPEAT) * torch.softmax(logits, 1) + INITIAL_REPEAT * short / short.sum(
            1, keepdim=True
        ).clamp(min=1e-30)
        torch.testing.assert_close(mixture[:2], expected[:2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["mixture", "mixture-attention"])
def test_without_the_logits_the_mixture_scans_the_catalogue_in_chunks(
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """The index path has no full logits: the catalogue's logsumexp is computed exactly, chunk by chunk."""
    import recsys.repeats

    torch.manual_seed(4)
    part = RepeatPart(16, form)
    _perturb(part)
    x, targets = torch.randn(2, 16), torch.randn(30, 16)
    torch.testing.assert_close(catalogue_logsumexp(x, targets, chunk=7), torch.logsumexp(x @ targets.T, 1, True))
    reps = _entries([[(5, 2, 2), (9, 1, 1)], [(3, 2, 1), (29, 1, 2)]], 4)
    with torch.inference_mode():
        items, bias = part(x, targets, reps, x @ targets.T)
        monkeypatch.setattr(recsys.repeats, "DENSE_ITEMS", 0)
        monkeypatch.setattr(recsys.repeats, "LSE_CHUNK", 7)
        gathered = part(x, targets, reps)
    assert torch.equal(gathered[0], items)
    torch.testing.assert_close(gathered[1], bias, rtol=1e-5, atol=1e-5)


def test_a_bundle_of_the_first_form_loads_and_scores_as_before() -> None:
    """A stored config without ``repeat_form`` (trained before the forms) rebuilds the first form, with its
    parameters (the same state dict keys) and its arithmetic; new configs default to the mixture."""
    stored = {"n_items": 30, "dim": 16, "code_dim": 8, "max_len": 6, "repeat_size": 4}
    assert ModelConfig.from_dict(stored).repeat_form == "mixture-attention"
    cfg = ModelConfig.from_stored(stored)
    assert cfg.repeat_form == "additive"
    torch.manual_seed(0)
    model = PersonaModel(cfg).eval()
    part = model.device_model.repeat
    assert part is not None and not part.mixture
    keys = sorted(k.removeprefix("device_model.repeat.") for k in model.state_dict() if ".repeat." in k)
    assert keys == [
        "features.0.bias",
        "features.0.weight",
        "features.2.bias",
        "features.2.weight",
        "gate.bias",
        "gate.weight",
        "query.bias",
        "query.weight",
    ]
    _perturb(part)
    hist = torch.tensor([[0, 0, 5, 7, 5, 9], [0, 0, 0, 3, 4, 3]])
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2)]], 4)
    with torch.inference_mode():
        dm = model.device_model
        x, targets = dm.head(dm.encode(hist)), dm.item_targets()
        expected = (x @ targets.T).scatter_add(1, reps[..., 0].long(), _first_form(part, x, targets, reps))
        torch.testing.assert_close(model.score(hist, repeats=reps), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repeat_form"):
        ModelConfig.from_dict({**stored, "repeat_form": "nope"})


def test_session_repeat_ranks_whole_history_counts_then_popularity() -> None:
    method = SessionRepeatMethod(np.array([0, 0, 5, 1, 9, 2, 3]))
    reps = _entries([[(3, 2, 4), (5, 2, 1), (6, 1, 2)]], 4)
    scores = method.score(torch.zeros(1, 3, dtype=torch.long), reps)
    order = torch.argsort(scores[0], descending=True).tolist()
    # 5 and 3 twice (5 more recent), then 6, then the rest by popularity (4: 9, 2: 5)
    assert order[:5] == [5, 3, 6, 4, 2]


def test_the_part_is_left_out_when_it_does_not_win_on_validation() -> None:
    df = generate(SyntheticConfig(users=40, items=30, events=1200, repeat=0.5, seed=2))
    split = make_split(df, max_len=6, repeat_size=4)
    model = PersonaModel(ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=6, repeat_size=4))
    model.freeze_device_model()
    tc = TrainConfig(repeat_epochs=1, patience=1)
    stage = train_repeat_part(model, split, tc, base_score=1.0, progress=False)  # nothing beats NDCG 1.0
    assert stage is not None
    assert model.device_model.repeat is None and model.cfg.repeat_size == 0
    assert evaluate_method(BaseMethod(model), split.valid)["ndcg@10"] < 1.0


def test_a_mixture_part_learns_its_repeat_distribution_and_takes_p_repeat_from_validation() -> None:
    """The mixture forms' stage: P_r trains by its own likelihood (the gate untouched), then p(repeat) is the
    validation-best of TrainConfig.repeat_gates; on a repeat-heavy stream the part wins and is kept."""
    import math

    df = generate(SyntheticConfig(users=40, items=30, events=1200, repeat=0.7, seed=2))
    split = make_split(df, max_len=6, repeat_size=4)
    model = PersonaModel(ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=6, repeat_size=4))
    model.freeze_device_model()
    part = model.device_model.repeat
    assert part is not None and part.mixture
    gate = part.gate.weight.clone()
    base = evaluate_method(BaseMethod(model, repeats=False), split.valid)["ndcg@10"]
    tc = TrainConfig(repeat_epochs=2, patience=2, repeat_gates=(0.2, 0.9))
    stage = train_repeat_part(model, split, tc, base_score=base, progress=False)
    assert stage is not None and model.device_model.repeat is part
    assert torch.equal(part.gate.weight, gate) and not any(p.requires_grad for p in part.parameters())
    p = 1 / (1 + math.exp(-float(part.gate.bias[0])))
    assert min(abs(p - g) for g in (0.2, 0.6, 0.9)) < 1e-6  # a candidate, or the initial value
    assert stage.best_ndcg10 == pytest.approx(evaluate_method(BaseMethod(model), split.valid)["ndcg@10"])
    assert stage.best_ndcg10 > base
    assert TrainConfig.from_dict(tc.to_dict()).repeat_gates == (0.2, 0.9)


# ----------------------------------------------------------------------------------------------- online


@pytest.fixture
def repeat_models(store: Store, repeat_bundle: Path) -> ModelProvider:
    return ModelProvider(store, model_dir=repeat_bundle)


def _offline(online: OnlineModel, seq: list[str]) -> tuple[list[int], list[int], list[int]]:
    """Per prediction of ``seq`` (from its second item): the offline ranks of Persona and base with the repeat part
    (recsys.model, counts from recsys.repeats.repeat_features), and Persona's without it."""
    model = online.model
    codes = np.array([online.index_of(i) for i in seq], dtype=np.int64)
    size = online.cfg.repeat_size
    persona, base, plain = [], [], []
    for i in range(1, len(seq)):
        hist = online.histories([seq[:i]])
        reps = torch.from_numpy(repeat_features(codes, np.array([0]), np.array([i]), size))
        target = torch.tensor([codes[i]])
        with torch.inference_mode():
            edit = model.edit_for(online.codes(hist), "prototype", hist)
            persona.append(int(target_ranks(model.score(hist, edit, repeats=reps), target)[0]))
            base.append(int(target_ranks(model.score(hist, repeats=reps), target)[0]))
            plain.append(int(target_ranks(model.score(hist, edit), target)[0]))
    return persona, base, plain


@pytest.mark.parametrize("model_process", [False, True])
def test_the_prequential_check_scores_with_the_repeat_part_as_offline(
    store: Store, repeat_models: ModelProvider, model_process: bool
) -> None:
    online = repeat_models.get()
    assert online.has_repeat_part
    items = list(online.vocab.ids)
    seq = [items[i] for i in (3, 7, 3, 11, 3, 7, 5, 12, 13, 14, 15, 16, 17, 3, 7)]  # more distinct items than R = 8
    events = [Event(f"r{i}", "rep", item, T0 + timedelta(seconds=i)) for i, item in enumerate(seq)]
    ingestor = Ingestor(store, repeat_models, model_process=model_process)
    try:
        # one event per batch: each prediction is scored from the stored state (and counts) of the one before
        results = [ingestor.apply([e]) for e in events]
    finally:
        ingestor.close()
    persona, base, plain = _offline(online, seq)
    assert persona != plain  # the part changes the ranking here, so the checks below can fail
    assert sum(r.reciprocal_rank["persona"] for r in results) == pytest.approx(sum(1 / (r + 1) for r in persona))
    assert sum(r.reciprocal_rank["base"] for r in results) == pytest.approx(sum(1 / (r + 1) for r in base))
    stored = store.get_session("rep")
    assert stored is not None and stored.item_counts == json.loads(RepeatCounts.of(seq, 8).to_json().json_text)


def test_one_batch_gives_the_same_check_as_one_event_at_a_time(store: Store, repeat_models: ModelProvider) -> None:
    online = repeat_models.get()
    items = list(online.vocab.ids)
    seq = [items[i] for i in (2, 4, 2, 6, 4, 2, 8)]
    events = [Event(f"b{i}", "batch", item, T0 + timedelta(seconds=i)) for i, item in enumerate(seq)]
    result = Ingestor(store, repeat_models).apply(events)
    persona, base, _ = _offline(online, seq)
    assert result.reciprocal_rank["persona"] == pytest.approx(sum(1 / (r + 1) for r in persona))
    assert result.reciprocal_rank["base"] == pytest.approx(sum(1 / (r + 1) for r in base))


def test_rankings_through_the_index_equal_full_scans_with_a_mixture_part(
    store: Store, repeat_models: ModelProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large catalogue's index has no full logits: the mixture's logsumexp is scanned in chunks, and the rankings
    are the full scan's."""
    import recsys.online
    import recsys.repeats

    online = repeat_models.get()
    assert online.model.device_model.repeat is not None and online.model.device_model.repeat.mixture
    items = list(online.vocab.ids)
    for n, pick in enumerate([(9, 10, 9, 11, 9, 12), (3, 4, 3, 3, 5), (7, 8)]):
        seq = [items[i] for i in pick]
        events = [Event(f"i{n}-{j}", f"ix{n}", it, T0 + timedelta(seconds=j)) for j, it in enumerate(seq)]
        Ingestor(store, repeat_models).apply(events)
    ranker = Ranker(store, repeat_models)
    queries = [RankQuery(session_id=f"ix{n}", k=10, exclude_seen=False) for n in range(3)]
    full = ranker.rank(queries)
    monkeypatch.setattr(recsys.online, "INDEXED_FROM", 0)
    monkeypatch.setattr(recsys.repeats, "DENSE_ITEMS", 0)
    monkeypatch.setattr(recsys.repeats, "LSE_CHUNK", 5)
    assert repeat_models.get().index is not None
    indexed = ranker.rank(queries)
    for a, b in zip(full, indexed, strict=True):
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        assert [v for _, v in a.items] == pytest.approx([v for _, v in b.items], rel=1e-5, abs=1e-5)


def test_the_api_ranks_with_the_stored_counts(store: Store, repeat_models: ModelProvider) -> None:
    online = repeat_models.get()
    items = list(online.vocab.ids)
    seq = [items[i] for i in (9, 10, 9, 11, 9, 12, 13, 14, 15, 16, 17, 18)]
    Ingestor(store, repeat_models).apply(
        [Event(f"a{i}", "api", it, T0 + timedelta(seconds=i)) for i, it in enumerate(seq)]
    )
    ranker = Ranker(store, repeat_models)
    [got] = ranker.rank([RankQuery(session_id="api", k=5, exclude_seen=False)])
    bank = ranker.bank(online)
    hist = online.histories([seq])
    counts = online.session_counts(store.get_session("api").item_counts)  # type: ignore[union-attr]
    with torch.inference_mode():
        edit = online.edit(online.codes(hist), bank, histories=hist)
        scores = online.scores(hist, edit, bank, online.repeat_entries([counts]))
        without = online.scores(hist, edit, bank)
    top = torch.topk(scores[0], 5)
    assert [i for i, _ in got.items] == online.decode(top.indices)
    assert [s for _, s in got.items] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert online.decode(torch.topk(without[0], 5).indices) != [i for i, _ in got.items]


def test_the_session_route_gives_a_device_the_stored_counts(store: Store, repeat_models: ModelProvider) -> None:
    """GET /v1/sessions/{id} carries the session's stored counts (a device that did not see every event adopts
    them), as stored."""
    from fastapi.testclient import TestClient

    from persona.settings import Settings
    from serving.app import create_app

    items = list(repeat_models.get().vocab.ids)
    seq = [items[i] for i in (4, 5, 4, 6, 4)]
    Ingestor(store, repeat_models).apply([Event(f"c{i}", "route", it, T0 + timedelta(seconds=i)) for i, it in
                                          enumerate(seq)])  # fmt: skip
    with TestClient(create_app(Settings(), store=store, models=repeat_models)) as client:
        summary = client.get("/v1/sessions/route").json()
    assert summary["item_counts"] == json.loads(RepeatCounts.of(seq, 8).to_json().json_text)
    back = RepeatCounts.from_json(summary["item_counts"], 8)
    assert back.table == RepeatCounts.of(seq, 8).table  # the floats survive the JSON exactly


def test_without_repeats_in_the_data_the_part_is_dropped_and_the_model_is_unchanged() -> None:
    """Where nobody chooses an item twice (MovieLens: nobody re-rates a film), the part can only push session items
    up past targets that are never among them, so validation always drops it; its own random stream leaves the rest
    of the model bit-identical to one trained without it."""
    from recsys.train import train_persona

    df = generate(SyntheticConfig(users=60, items=80, events=2500, seed=4)).unique(["user_id", "item_id"], keep="first")
    df = df.sort("ts", maintain_order=True)
    tc = TrainConfig(epochs=1, adapter_epochs=1, proto_rounds=1, proto_epochs=1, k_candidates=(4,), repeat_epochs=2)
    states = []
    for size in (0, 8):
        split = make_split(df, max_len=10, repeat_size=size)
        cfg = ModelConfig(n_items=split.vocab.size, dim=16, code_dim=8, max_len=10, repeat_size=size)
        result = train_persona(split, cfg, tc, progress=False)
        assert result.model.device_model.repeat is None and result.model.cfg.repeat_size == 0
        states.append(result.model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("form", FORMS)
def test_the_device_graph_of_a_repeat_model_scores_like_the_server(form: str) -> None:
    """The exported graph takes the session's counts as one more input and adds the same repeat bias (every form:
    the mixture forms' catalogue logsumexp is in the graph)."""
    import onnxruntime as ort

    from recsys.export import REPEAT_INPUT, device_manifest, export_onnx
    from recsys.vocab import ItemVocab

    model = _model(repeat_size=4, form=form)
    vocab = ItemVocab([str(i) for i in range(28)])
    manifest = device_manifest(model, vocab, "test")
    assert manifest["inputs"][-1] == REPEAT_INPUT and manifest["repeat"]["size"] == 4
    graph = export_onnx(model, vocab, "test", k=5)
    hist = torch.tensor([[0, 0, 5, 7, 5, 9], [0, 0, 0, 3, 4, 3], [0, 0, 0, 0, 0, 6]])
    reps = _entries([[(5, 2, 2), (9, 1, 1), (7, 1, 3)], [(3, 2, 1), (4, 1, 2)], []], 4)
    with torch.inference_mode():
        edit = model.session_edit(hist, mode="session")
        expected = model.score(hist, edit, repeats=reps)
    expected = expected.clone()
    expected[:, :2] = float("-inf")
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    cfg = model.cfg
    scores, top_i, _ = session.run(
        None,
        {
            "history": hist.numpy(),
            "seen": np.zeros((3, 1), dtype=np.int64),
            "delta_weight": edit.weight.numpy(),
            "delta_bias": edit.bias.numpy(),
            "item_bias": np.zeros((3, cfg.n_items), dtype=np.float32),
            REPEAT_INPUT: reps.numpy(),
        },
    )
    finite = np.isfinite(expected.numpy())
    assert np.array_equal(np.isfinite(scores), finite)
    np.testing.assert_allclose(scores[finite], expected.numpy()[finite], atol=1e-4, rtol=1e-4)
    assert np.array_equal(top_i, torch.topk(expected, 5, dim=1).indices.numpy())
    # no repeat part: the graph keeps its five inputs
    plain = PersonaModel(ModelConfig(n_items=30, dim=16, code_dim=8, max_len=6)).eval()
    assert REPEAT_INPUT not in device_manifest(plain, vocab, "test")["inputs"]


def test_the_api_recommends_seen_items_by_default_only_for_a_re_consuming_model(
    store: Store, repeat_models: ModelProvider, tiny_bundle: Path, tmp_path: Path
) -> None:
    online = repeat_models.get()
    items = list(online.vocab.ids)
    seq = [items[i] for i in (9, 10, 9, 11, 9, 12, 13, 14, 15, 16, 17, 18)]
    Ingestor(store, repeat_models).apply(
        [Event(f"d{i}", "dflt", it, T0 + timedelta(seconds=i)) for i, it in enumerate(seq)]
    )
    ranker = Ranker(store, repeat_models)
    [default, allowed, excluded] = ranker.rank(
        [RankQuery(session_id="dflt", k=5), RankQuery(session_id="dflt", k=5, exclude_seen=False),
         RankQuery(session_id="dflt", k=5, exclude_seen=True)]
    )  # fmt: skip
    assert online.has_repeat_part
    assert [i for i, _ in default.items] == [i for i, _ in allowed.items]
    assert not {i for i, _ in excluded.items} & set(seq)
    # A model without the repeat part keeps leaving the history out by default.
    other = Store.open(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        plain = ModelProvider(other, model_dir=tiny_bundle)
        assert not plain.get().has_repeat_part
        events = [Event(f"p{i}", "plain", it, T0 + timedelta(seconds=i)) for i, it in enumerate(seq)]
        Ingestor(other, plain).apply(events)
        [plain_default] = Ranker(other, plain).rank([RankQuery(session_id="plain", k=5)])
    finally:
        other.close()
    assert not {i for i, _ in plain_default.items} & set(seq)

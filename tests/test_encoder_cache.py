"""The encoder cache against the encoder run on every window whole, and the windows it relies on."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from recsys.encoder_cache import EncoderCache, WindowRequest
from recsys.model import PAD, ModelConfig, PersonaModel
from recsys.windows import window_length, window_lengths

MAX_LEN = 12


def _model(**overrides: object) -> PersonaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=60, dim=16, code_dim=8, max_len=MAX_LEN, n_prototypes=4, adapter_window=4, **overrides)  # type: ignore[arg-type]
    return PersonaModel(cfg).eval()


@torch.inference_mode()
def _whole(model: PersonaModel, window: list[int]) -> torch.Tensor:
    padded = torch.tensor([[PAD] * (model.cfg.max_len - len(window)) + window])
    return model.device_model.encode(padded)[0]


def _events(
    model: PersonaModel, history: list[int], new: int, rng: random.Random
) -> tuple[list[WindowRequest], list[torch.Tensor], str]:
    """Append ``new`` items to ``history``: the requests for their states (one per window) and the states whole."""
    key = str(id(history))
    cfg = model.cfg
    requests: list[WindowRequest] = []
    expected: list[torch.Tensor] = []
    for _ in range(new):
        history.append(rng.randrange(2, cfg.n_items))
        n = len(history)
        size = window_length(n, cfg.max_len, cfg.stride)
        window = history[n - size :]
        expected.append(_whole(model, window))
        last = requests[-1] if requests else None
        if last is not None and last.start == n - size:
            requests[-1] = WindowRequest(key, last.start, window, last.wanted + 1)
        else:
            requests.append(WindowRequest(key, n - size, window, 1))
    return requests, expected, key


@pytest.mark.parametrize("capacity", [2, 64])
def test_cached_states_equal_whole_windows(capacity: int) -> None:
    """Windows growing across calls, restarting inside one (two requests for one key), more sessions than slots."""
    model = _model()
    assert model.cfg.stride == 6
    cache = EncoderCache(model.device_model, capacity)
    rng = random.Random(1)
    histories: list[list[int]] = [[] for _ in range(5)]
    for _ in range(60):
        requests: list[WindowRequest] = []
        expected: list[torch.Tensor] = []
        for h in rng.sample(histories, 3):
            reqs, exp, _ = _events(model, h, rng.randint(1, 8), rng)
            requests += reqs
            expected += exp
        torch.testing.assert_close(cache.encode(requests), torch.stack(expected), atol=1e-5, rtol=1e-4)
    assert len(cache) <= capacity


def test_a_growing_window_encodes_only_its_new_items() -> None:
    model = _model()
    cache = EncoderCache(model.device_model, 8)
    window = [5, 6, 7, 8]
    cache.encode([WindowRequest("a", 0, window, 4)])
    assert (cache.encoded, cache.hits) == (4, 0)
    out = cache.encode([WindowRequest("a", 0, [*window, 9], 1)])
    assert (cache.encoded, cache.hits) == (5, 4)
    torch.testing.assert_close(out[0], _whole(model, [*window, 9]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "later",
    [
        WindowRequest("a", 0, [5, 9, 7, 8, 10], 1),  # same start, another item inside the window
        WindowRequest("a", 6, [5, 6, 7, 8, 10], 1),  # same items, another window
        WindowRequest("a", 0, [5, 6, 7, 8], 2),  # states the cache holds no outputs for
    ],
)
def test_an_entry_is_used_only_for_what_it_was_computed_from(later: WindowRequest) -> None:
    model = _model()
    cache = EncoderCache(model.device_model, 8)
    cache.encode([WindowRequest("a", 0, [5, 6, 7, 8], 4)])
    out = cache.encode([later])
    expected = [
        _whole(model, later.items[:j]) for j in range(len(later.items) - later.wanted + 1, len(later.items) + 1)
    ]
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_a_failed_call_forgets_what_it_half_wrote() -> None:
    model = _model()
    cache = EncoderCache(model.device_model, 8)
    cache.encode([WindowRequest("a", 0, [5, 6], 2)])
    with pytest.raises(IndexError):
        cache.encode([WindowRequest("a", 0, [5, 6, 10_000], 1)])  # not an item of the table
    assert len(cache) == 0
    out = cache.encode([WindowRequest("a", 0, [5, 6, 7], 1)])
    torch.testing.assert_close(out[0], _whole(model, [5, 6, 7]), atol=1e-5, rtol=1e-4)


def test_bad_requests_and_unsupported_models_are_refused() -> None:
    cache = EncoderCache(_model().device_model, 8)
    with pytest.raises(ValueError, match="wanted"):
        cache.encode([WindowRequest("a", 0, [5, 6], 3)])
    with pytest.raises(ValueError, match="stride"):
        EncoderCache(_model(window_stride=0).device_model, 8)
    with pytest.raises(ValueError, match="stride"):
        EncoderCache(_model(encoder="gru4rec").device_model, 8)


def test_windows_start_every_stride_items_and_grow_between_starts() -> None:
    t, s = 12, 5
    sizes = [window_length(n, t, s) for n in range(0, 60)]
    assert sizes[: t + 1] == list(range(t + 1))  # the first window: the whole history
    for n in range(t + 1, 60):
        assert t - s + 1 <= sizes[n] <= t
        assert (n - sizes[n]) % s == 0  # later windows start at a multiple of the stride
        assert sizes[n] == sizes[n - 1] + 1 or n - sizes[n] > n - 1 - sizes[n - 1]  # grows, or a new one starts
    assert [window_length(n, t, 0) for n in (0, 5, 12, 40)] == [0, 5, 12, 12]  # stride 0: the last max_len items
    n = np.arange(0, 60)
    assert window_lengths(n, t, s).tolist() == sizes
    assert window_lengths(n, t, 0).tolist() == [window_length(int(k), t, 0) for k in n]


def test_positions_count_from_the_window_start_and_old_bundles_keep_theirs() -> None:
    """With a stride, a window's state does not depend on how much padding is left of it; a bundle config written
    before windows had a stride loads with the sliding window it was trained on."""
    model = _model()
    window = [5, 6, 7]
    with torch.inference_mode():
        short = model.device_model.encode(torch.tensor([window]))[0]
    torch.testing.assert_close(short, _whole(model, window), atol=1e-5, rtol=1e-4)
    mask = torch.tensor([[False, False, True, True, True]])
    encoder = model.device_model.encoder
    torch.testing.assert_close(encoder.positions(mask)[0, 2:], encoder.pos[:3])
    legacy = _model(window_stride=0).device_model.encoder
    torch.testing.assert_close(legacy.positions(mask)[2:], legacy.pos[-3:])
    stored = {k: v for k, v in model.cfg.to_dict().items() if k != "window_stride"}
    assert ModelConfig.from_stored(stored).stride == 0
    assert ModelConfig.from_stored(model.cfg.to_dict()).stride == model.cfg.stride
    with pytest.raises(ValueError, match="window_stride"):
        ModelConfig(n_items=10, max_len=8, window_stride=9)

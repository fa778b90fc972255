"""A few sessions' edit codes and edits in NumPy: what one ranking request or one device export needs.

At batch 1, torch's per-call overhead is most of an edit's cost (measured on the 2-core VM: 1.0 ms for one
session's codes and prototype edit, where the arithmetic is a GRU over ≤ 10 items, a 2-step cross-layer GRU and one
generator product). :class:`EditRows` runs the same arithmetic in float32 with frozen weights, row by row, as
:class:`recsys.repeat_rows.RepeatRows` does for the repeat part: :meth:`codes` follows
:meth:`recsys.model.CloudAdapter.codes_from_inputs` (padding skipped as packing skips it), :meth:`residual` the
clipped session residual of :meth:`recsys.model.PersonaModel.prototype_edit`. The results agree with torch's within
float32 rounding (tests/test_inference_paths.py).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from recsys.model import PAD, PersonaModel


def _arr(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


class _Gru:
    """One GRU layer's weights (gates r, z, n in torch's order), transposed for row-vector products."""

    def __init__(self, gru: nn.GRU) -> None:
        self.w_ih, self.b_ih = _arr(gru.weight_ih_l0.T), _arr(gru.bias_ih_l0)  # type: ignore[arg-type]
        self.w_hh, self.b_hh = _arr(gru.weight_hh_l0.T), _arr(gru.bias_hh_l0)  # type: ignore[arg-type]
        self.size = gru.hidden_size

    def step(self, x_proj: np.ndarray, h: np.ndarray) -> np.ndarray:
        """The next state from the input's projection ``x W_ih + b_ih`` [3H] and the state h [H]."""
        n_h = self.size
        hh = h @ self.w_hh + self.b_hh
        r = _sigmoid(x_proj[:n_h] + hh[:n_h])
        z = _sigmoid(x_proj[n_h : 2 * n_h] + hh[n_h : 2 * n_h])
        n = np.tanh(x_proj[2 * n_h :] + r * hh[2 * n_h :])
        return n + z * (h - n)


class EditRows:
    """:meth:`codes` and :meth:`residual` of a frozen model for a few rows (see the module's docstring).

    ``item_inputs`` [N, 3D] are the session GRU's input projections of every item
    (:meth:`recsys.model.CloudAdapter.item_inputs`), computed here when not given.
    """

    def __init__(self, model: PersonaModel, item_inputs: Tensor | None = None) -> None:
        adapter, cfg = model.adapter, model.cfg
        if item_inputs is None:
            item_inputs = adapter.item_inputs(model.device_model.items.weight)
        self.inputs = _arr(item_inputs)
        self.session = _Gru(adapter.session_gru)
        self.layer = _Gru(adapter.layer_gru)
        self.w_code, self.b_code = _arr(adapter.to_code.weight.T), _arr(adapter.to_code.bias)
        self.w_layer, self.b_layer = _arr(adapter.to_layer_code.weight.T), _arr(adapter.to_layer_code.bias)
        self.n_layers, self.dim, self.window = cfg.n_edit_layers, cfg.dim, cfg.adapter_window
        self.residual_weight, self.residual_tau = np.float32(cfg.residual_weight), np.float32(cfg.residual_tau)
        self.low_rank = cfg.edit_rank > 0
        if self.low_rank:
            self.gen_scale, self.factor_a = _arr(adapter.gen_scale), _arr(adapter.factor_a)
            self.factor_b = _arr(adapter.factor_b)
        else:
            self.gen_weight = _arr(adapter.gen_weight)  # [L, d, D*D]
        self.gen_bias = _arr(adapter.gen_bias)  # [L, d, D]

    def codes(self, histories: np.ndarray) -> np.ndarray:
        """Edit codes [B, L, d] of left-padded histories [B, T] (their last ``adapter_window`` items are read)."""
        return np.stack([self._code(row[-self.window :]) for row in histories])

    def _code(self, recent: np.ndarray) -> np.ndarray:
        items = recent[recent != PAD]
        if len(items) == 0:  # as packing does: an empty window reads its last (padding) position
            items = recent[-1:]
        h = np.zeros(self.session.size, dtype=np.float32)
        for item in items:
            h = self.session.step(self.inputs[item], h)
        z = h @ self.w_code + self.b_code
        x_proj = z @ self.layer.w_ih + self.layer.b_ih  # the same input at every layer step
        hl = np.zeros(self.layer.size, dtype=np.float32)
        states = []
        for _ in range(self.n_layers):
            hl = self.layer.step(x_proj, hl)
            states.append(hl)
        return np.tanh(np.stack(states) @ self.w_layer + self.b_layer)

    def residual(self, codes: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clipped session residuals ``clip(λ G (c − μ), ±τ_r)``: (ΔW [B, L, D, D], Δb [B, L, D]) for codes and
        their prototypes' centres [B, L, d]."""
        res = (codes - centres) * self.residual_weight
        b, n_layers, dim = res.shape[0], self.n_layers, self.dim
        if self.low_rank:
            s = np.einsum("bld,ldr->blr", res, self.gen_scale)
            dw = np.einsum("lir,blr,lrj->blij", self.factor_a, s, self.factor_b)
        else:
            dw = np.einsum("bld,ldk->blk", res, self.gen_weight).reshape(b, n_layers, dim, dim)
        db = np.einsum("bld,ldk->blk", res, self.gen_bias)
        t = self.residual_tau
        return np.clip(dw, -t, t), np.clip(db, -t, t)

    def edit(
        self,
        codes: np.ndarray,
        centres: np.ndarray,
        prototypes: np.ndarray,
        prototype_edits: tuple[np.ndarray | Tensor, np.ndarray | Tensor],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prototype-mode edits (ΔW [B, L, D, D], Δb [B, L, D]) of codes [B, L, d] assigned to ``prototypes`` [B], as
        :meth:`recsys.model.PersonaModel.prototype_edit`: each prototype's own clipped edit
        (:meth:`recsys.model.PersonaModel.prototype_edits`, which depends on the bank alone, so serving computes it
        once per bank snapshot) plus the session's clipped residual. ``centres`` [K, L, d] are the bank's."""
        res_w, res_b = self.residual(codes, centres[prototypes])
        proto_w, proto_b = (np.asarray(t)[prototypes] for t in prototype_edits)
        return proto_w + res_w, proto_b + res_b

"""The edited head without materialising each session's edit (exact whenever the residual clip is inactive).

Persona's edit of a session with code ``c`` and prototype ``k`` is, per editable layer l (METHOD.md §3),
``ΔW_l = P_kl + clip(Σ_j a_j G_lj, ±τ_r)`` with ``a = λ (c_l − μ_kl)`` and ``P_kl`` the prototype's own clipped
edit. Materialising it costs L·D² floats per session and several passes over them (generate, clip, add, multiply);
that was most of an edit's cost in the consumer and in every ranking.

When the clip cannot engage, the residual is linear in ``a`` and the edited layer factors:
``(W_l + ΔW_l) x = (W_l + P_kl) x + Σ_j a_j (G_lj x)``: one [B, D] × [D, d·D] product for all sessions and all
code entries, plus a prototype lookup; nothing of size B·L·D² is ever written. Whether the clip can engage is
decided per row by a bound: ``|Σ_j a_j G_lj[o, i]| ≤ ‖a‖₂ · max_oi ‖G_l[:, o, i]‖₂`` (Cauchy–Schwarz). Rows whose
bound exceeds ``τ_r`` (rare on trained models: the clip "rarely engages", docs/results.md) take the materialised
path, so every row gets exactly the edit :meth:`PersonaModel.prototype_edit` defines, up to float rounding.

The edit's Frobenius norm (the ``edit_norm_ratio`` drift signal) factors the same way:
``‖P + R‖² = ‖P‖² + 2 a·⟨P, G⟩ + aᵀ (G Gᵀ) a``, O(d²) per row.

    >>> head = EditedHead.build(model, centres)                      # once per prototype-bank snapshot
    >>> q, ratios = head.queries(states, codes, prototypes, centres)  # [B, D] head outputs, [B] ‖ΔW‖/‖W‖
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from recsys.model import PersonaModel

#: Up to this many rows :meth:`EditedHead.queries` runs in NumPy (see :meth:`EditedHead._small`).
SMALL_BATCH = 4


def generator_matrix(model: PersonaModel) -> Tensor:
    """The adapter's weight generator as G [L, d, D·D] (ΔW_l = Σ_j c_j G_lj before clipping), for full and low rank."""
    adapter = model.adapter
    if model.cfg.edit_rank > 0:
        dim = model.cfg.dim
        g = torch.einsum("ldr,lir,lrj->ldij", adapter.gen_scale, adapter.factor_a, adapter.factor_b)
        return g.reshape(g.shape[0], g.shape[1], dim * dim)
    return adapter.gen_weight


@dataclass(frozen=True)
class GeneratorTerms:
    """The parts of the factored head that depend on the model alone (cached per model).

    ``gen_x`` [L, D, d·D]: ``x ↦ (G_lj x)_j``; ``gen_bias`` [L, d, D]; ``bound_w``/``bound_b`` [L]: the largest
    ``‖G[:, o, i]‖₂`` (and bias entry) per layer; ``g_flat`` [L, d, D·D] (float64); ``gram`` [L, d, d] ``G Gᵀ``.
    """

    gen_x: Tensor
    gen_bias: Tensor
    bound_w: Tensor
    bound_b: Tensor
    g_flat: Tensor
    gram: Tensor

    @classmethod
    @torch.inference_mode()
    def build(cls, model: PersonaModel) -> GeneratorTerms:
        cfg = model.cfg
        n_layers, dim, d = cfg.n_edit_layers, cfg.dim, cfg.code_dim
        g = generator_matrix(model).view(n_layers, d, dim, dim)  # [L, d, D_out, D_in]
        g_flat = g.reshape(n_layers, d, dim * dim).double()
        gen_bias = model.adapter.gen_bias.detach().clone()
        return cls(
            gen_x=g.permute(0, 3, 1, 2).reshape(n_layers, dim, d * dim).contiguous(),
            gen_bias=gen_bias,
            bound_w=g_flat.norm(dim=1).amax(dim=1).float(),
            bound_b=gen_bias.norm(dim=1).amax(dim=1),
            g_flat=g_flat,
            gram=torch.einsum("lin,ljn->lij", g_flat, g_flat),
        )

    @torch.inference_mode()
    def first_products(self, states: Tensor) -> Tensor:
        """``(G_1j x)_j`` [B, d, D] for user states x [B, D]: the first layer's generator products, the largest
        product of the factored head, and independent of the prototype bank, so they can be computed before the
        bank a batch is scored with is known (:meth:`EditedHead.queries` takes them as ``first``)."""
        return (states @ self.gen_x[0]).view(states.shape[0], self.gen_bias.shape[1], -1)


@dataclass(frozen=True)
class EditedHead:
    """Everything the factored edited head needs for one bank snapshot (see the module docstring).

    Shapes: K prototypes, L layers, d code width, D model width.
    ``proto_weight`` [L, D, K·D] and ``proto_bias`` [K, L, D]: ``W_l + P_kl`` (as x-products) and ``b_l + Pb_kl``;
    ``proto_sq`` [K] ``‖P_k‖²``; ``cross`` [K, L, d] ``⟨P_kl, G_lj⟩``; ``gen``: the model's :class:`GeneratorTerms`.
    """

    model: PersonaModel
    gen: GeneratorTerms
    n_prototypes: int
    proto_weight: Tensor
    proto_bias: Tensor
    proto_sq: Tensor
    cross: Tensor
    base_norm: float

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        model: PersonaModel,
        centres: Tensor,
        bank_edits: tuple[Tensor, Tensor] | None = None,
        gen: GeneratorTerms | None = None,
    ) -> EditedHead:
        """Precompute for the centres [K, L, d]; ``bank_edits`` = :meth:`PersonaModel.prototype_edits` if known."""
        cfg, dm = model.cfg, model.device_model
        n_layers, dim = cfg.n_edit_layers, cfg.dim
        gen = gen if gen is not None else GeneratorTerms.build(model)
        proto_w, proto_b = bank_edits if bank_edits is not None else model.prototype_edits(centres)
        k = proto_w.shape[0]
        weights = dm.head_weight.unsqueeze(0) + proto_w  # [K, L, D_out, D_in]
        p_flat = proto_w.reshape(k, n_layers, dim * dim).double()
        return cls(
            model=model,
            gen=gen,
            n_prototypes=k,
            # x [B, D_in] @ proto_weight[l] -> [B, K·D_out]: column block k holds (W_l + P_kl) x
            proto_weight=weights.permute(1, 3, 0, 2).reshape(n_layers, dim, k * dim).contiguous(),
            proto_bias=(dm.head_bias.unsqueeze(0) + proto_b).contiguous(),
            proto_sq=p_flat.pow(2).sum(dim=(1, 2)),
            cross=torch.einsum("kln,ljn->klj", p_flat, gen.g_flat),
            base_norm=float(dm.head_weight.norm().clamp(min=1e-12)),
        )

    @torch.inference_mode()
    def queries(
        self, states: Tensor, codes: Tensor, prototypes: Tensor, centres: Tensor, first: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Edited head outputs [B, D] for user states [B, D], codes [B, L, d] and prototype ids [B] (all ≥ 0),
        with each row's ``edit_norm_ratio`` (‖ΔW‖_F / ‖W‖_F) [B]; ``centres`` [K, L, d] are the bank this head was
        built for. Exactly ``model.device_model.head(states, model.prototype_edit(codes, centres, prototypes))``.
        ``first``: the states' :meth:`GeneratorTerms.first_products`, when already computed.
        """
        cfg = self.model.cfg
        b, dim, tau = states.shape[0], cfg.dim, cfg.residual_tau
        if b <= SMALL_BATCH:
            small = self._small(states, codes, prototypes, centres)
            if small is not None:
                return small
        a = (codes - centres[prototypes]) * cfg.residual_weight  # [B, L, d]
        a_norm = a.norm(dim=2)  # [B, L]
        exact = ((a_norm * self.gen.bound_w <= tau) & (a_norm * self.gen.bound_b <= tau)).all(dim=1)
        out = torch.empty(b, dim)
        norms = torch.empty(b)
        fast = exact.nonzero().flatten()
        slow = (~exact).nonzero().flatten()
        if len(fast) == b:
            out, norms = self._factored(states, a, prototypes, first)
        elif len(fast):
            out[fast], norms[fast] = self._factored(
                states[fast], a[fast], prototypes[fast], None if first is None else first[fast]
            )
        if len(slow):  # the residual clip may engage: materialise these rows' edits
            edit = self.model.prototype_edit(codes[slow], centres, prototypes[slow])
            out[slow] = self.model.device_model.head(states[slow], edit)
            norms[slow] = edit.weight.flatten(1).norm(dim=1)
        return out, norms / self.base_norm

    def _small(
        self, states: Tensor, codes: Tensor, prototypes: Tensor, centres: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """:meth:`queries` for a few rows (a single ranking) in NumPy: the same products, without torch's
        per-operation overhead, which is most of the cost at this size. ``None`` when a row's clip may engage."""
        cfg = self.model.cfg
        n_layers, dim, d, tau = cfg.n_edit_layers, cfg.dim, cfg.code_dim, cfg.residual_tau
        protos = prototypes.numpy()
        a = (codes.numpy() - centres.numpy()[protos]) * np.float32(cfg.residual_weight)  # [B, L, d]
        a_norm = np.sqrt(np.einsum("bld,bld->bl", a, a))
        if (a_norm * self.gen.bound_w.numpy() > tau).any() or (a_norm * self.gen.bound_b.numpy() > tau).any():
            return None
        b = a.shape[0]
        rows = np.arange(b)
        x = states.numpy()
        proto_weight, proto_bias = self.proto_weight.numpy(), self.proto_bias.numpy()
        gen_x, gen_bias = self.gen.gen_x.numpy(), self.gen.gen_bias.numpy()
        for layer in range(n_layers):
            al = a[:, layer]
            y = (x @ proto_weight[layer]).reshape(b, self.n_prototypes, dim)[rows, protos]
            y += np.matmul(al[:, None, :], (x @ gen_x[layer]).reshape(b, d, dim))[:, 0]
            y += proto_bias[protos, layer] + al @ gen_bias[layer]
            x = np.tanh(y) if layer < n_layers - 1 else y
        a64 = a.astype(np.float64)
        sq = (
            self.proto_sq.numpy()[protos]
            + 2.0 * (a64 * self.cross.numpy()[protos]).sum(axis=(1, 2))
            + np.einsum("bli,lij,blj->b", a64, self.gen.gram.numpy(), a64)
        )
        ratios = np.sqrt(np.maximum(sq, 0.0)) / self.base_norm
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(ratios.astype(np.float32))

    def _factored(
        self, states: Tensor, a: Tensor, prototypes: Tensor, first: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        cfg = self.model.cfg
        b, n_layers, dim, d = states.shape[0], cfg.n_edit_layers, cfg.dim, cfg.code_dim
        rows = torch.arange(b)
        x = states
        for layer in range(n_layers):
            base = (x @ self.proto_weight[layer]).view(b, self.n_prototypes, dim)[rows, prototypes]
            gen = first if layer == 0 and first is not None else (x @ self.gen.gen_x[layer]).view(b, d, dim)
            al = a[:, layer]
            y = base + torch.bmm(al.unsqueeze(1), gen).squeeze(1)
            y = y + self.proto_bias[prototypes, layer] + al @ self.gen.gen_bias[layer]
            x = torch.tanh(y) if layer < n_layers - 1 else y
        a64 = a.double()
        sq = (
            self.proto_sq[prototypes]
            + 2.0 * (a64 * self.cross[prototypes]).sum(dim=(1, 2))
            + torch.einsum("bli,lij,blj->b", a64, self.gen.gram, a64)
        )
        return x, sq.clamp(min=0.0).sqrt().float()

"""The Persona model in one file: device model, cloud adapter, prototype bank (METHOD.md §1–3).

Shapes used throughout: B = batch of sessions, T = history length (left-padded, most recent item last),
N = catalogue size (index 0 = padding, 1 = unknown item), D = embedding width, L = editable layers,
d = code width, K = prototypes.

    >>> cfg = ModelConfig(n_items=100)
    >>> model = PersonaModel(cfg)
    >>> hist = torch.randint(2, 100, (4, cfg.max_len))
    >>> model.score(hist).shape                      # base model
    torch.Size([4, 100])
    >>> edit = model.session_edit(hist)             # Persona: one forward pass, no gradient step
    >>> model.score(hist, edit).shape
    torch.Size([4, 100])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from recsys.repeats import ADDITIVE, DEFAULT_FORM, FORMS, RepeatPart, add_repeat_bias
from recsys.switch import neutral_switches

PAD = 0
UNK = 1
Encoder = Literal["sasrec", "gru4rec"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored in the bundle as ``config.json``."""

    n_items: int
    dim: int = 64
    max_len: int = 50
    encoder: Encoder = "sasrec"
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    n_edit_layers: int = 2
    code_dim: int = 32
    edit_rank: int = 0  # 0 = full D×D edits; r > 0 = ΔW = A diag(s) B with rank r
    tau: float = 0.5  # clip of every generated weight/bias entry
    residual_tau: float = 0.25  # clip of the session residual on top of its prototype's edit
    residual_weight: float = 1.0  # λ: 0 = the prototype's edit alone, 1 = the full session residual
    adapter_window: int = 10  # the adapter reads this many most recent items
    n_prototypes: int = 8
    proto_n0: float = 10.0  # refinement rate η_k = max(1 / (n_k + n0), eta_floor)
    proto_eta_floor: float = 0.01
    min_session_items: int = 1  # shorter sessions fall back to the base model
    # The prototypes' group bias (METHOD.md §3b): each prototype keeps a decayed count of its members' next items,
    # and a session assigned to it gets ``β · log1p(count_i / (α · mean count))`` added to item i's score.
    # β = 0 turns it off (bundles trained before it load with 0); β, α and the decay are chosen on validation.
    group_bias_weight: float = 0.0  # β
    group_bias_smoothing: float = 1.0  # α: pseudo-count, as a multiple of the prototype's mean count per item
    group_bias_decay: float = 1.0  # γ: a prototype's counts are multiplied by γ for each new member event
    # Fine groups (METHOD.md §3b, docs/results.md): ``fine_groups`` K2 finer groups of the sessions' codes (k-means on
    # the training codes, then fixed), each with the distribution of what its members chose next in the training and
    # validation periods. A session adds ``β2 · log1p(Σ_f w_f P_f(i) · N / α2)``, w its soft membership
    # (:func:`fine_weights`, temperature τ2; 0 = its nearest group alone). They are part of the model, not of the live
    # bank: a function of the session's code. 0 groups = none (bundles trained before them, or validation said no).
    fine_groups: int = 0
    fine_bias_weight: float = 0.0  # β2
    fine_bias_smoothing: float = 1.0  # α2
    fine_temperature: float = 0.0  # τ2
    # History groups (METHOD.md §3b, docs/results.md, "Groups keyed by the whole window"): ``history_groups`` G groups
    # of the sessions' whole encoder windows, keyed by the mean of the device model's item embeddings over the window
    # (spherical k-means on the training period's windows, then fixed), each with the distribution of what its
    # members chose next in the training and validation periods (decayed by γ3 per member event). A session adds
    # ``β3 · log1p(P_g(i) · N / α3)`` for its nearest group g. The prototypes and fine groups read the code, a function
    # of the last ``adapter_window`` items; these read the whole window (who the user is, not only where they are
    # now). 0 groups = none (bundles trained before them, or validation said no).
    history_groups: int = 0
    history_bias_weight: float = 0.0  # β3
    history_bias_smoothing: float = 1.0  # α3
    history_bias_decay: float = 1.0  # γ3 (used while counting the training and validation periods only)
    # The encoder's window (recsys.windows): 0 = the last max_len items, positions counted from the most recent
    # (bundles trained before windows had a stride load as 0); S > 0 = a window that starts every S items,
    # positions counted from its start. None = max_len // 2, at most max_len - adapter_window + 1.
    window_stride: int | None = None
    # The repeat part (recsys.repeats.RepeatPart): R > 0 = the device model reads the session's whole history as at
    # most R (item, count, age) entries and mixes "repeat one of them" with "explore the catalogue"; 0 = none
    # (bundles trained before it, and data where it did not win on validation).
    repeat_size: int = 0
    # The repeat part's form (recsys.repeats.FORMS): "mixture-attention" (the default) and "mixture" = a
    # probability-space mixture whose repeat distribution starts as the session's decayed counts, with and without
    # an attention term; bundles trained before the field load as "additive" (the first form).
    repeat_form: str = DEFAULT_FORM

    def __post_init__(self) -> None:
        if self.repeat_form not in FORMS:
            raise ValueError(f"repeat_form must be one of {', '.join(FORMS)}, got {self.repeat_form!r}")
        if self.window_stride is None:
            self.window_stride = max(1, min(self.max_len // 2, self.max_len - self.adapter_window + 1))
        if not 0 <= self.window_stride <= self.max_len:
            raise ValueError(f"window_stride must be in [0, max_len={self.max_len}], got {self.window_stride}")

    @property
    def stride(self) -> int:
        """:attr:`window_stride`, resolved."""
        return self.window_stride or 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> ModelConfig:
        """A bundle's config: one written before windows had a stride keeps the sliding window it was trained on, one
        written before the repeat part had forms keeps its first form."""
        return cls.from_dict({"window_stride": 0, "repeat_form": ADDITIVE, **data})


class Edit(NamedTuple):
    """Per-session additive edits of the editable layers.

    ``weight``: [B, L, D, D], ``bias``: [B, L, D]; ``prototype``: [B] int64 (-1 = none); ``codes``: the sessions'
    edit codes [B, L, d] a prototype-mode edit was made from (the fine groups' bias reads them; None otherwise);
    ``groups``: the sessions' history groups [B] (-1 = none; :meth:`PersonaModel.history_groups`), when the edit was
    made from their histories and the model has them.
    """

    weight: Tensor
    bias: Tensor
    prototype: Tensor
    codes: Tensor | None = None
    groups: Tensor | None = None


# --------------------------------------------------------------------------------------------- device model


class ItemTable(nn.Module):
    """Item embeddings on a TorchRec ``EmbeddingCollection`` (shardable by ``DistributedModelParallel``).

    Call args: ``ids`` int64 [B, T]. Returns [B, T, D] (padding rows are zeroed by the caller's mask).
    """

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.collection = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="item_table", embedding_dim=dim, num_embeddings=n_items, feature_names=["item"])
            ],
            device=torch.device("cpu"),
        )
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    @property
    def weight(self) -> Tensor:
        """[N, D]: the whole table, for full-catalogue scoring."""
        return self.collection.embeddings["item_table"].weight

    def lookup(self, ids: Tensor) -> Tensor:
        """The same rows as :meth:`forward` [B, T, D], read straight from the local table (inference only:
        no jagged-tensor wrapping, which cost more than the lookup itself for every small batch)."""
        return F.embedding(ids, self.weight)

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item"], values=ids.reshape(-1), lengths=torch.full((b,), t, dtype=torch.long)
        )
        return self.collection(kjt)["item"].values().view(b, t, -1)


class SASRecEncoder(nn.Module):
    """Causal self-attention over the history with learned positions (SASRec).

    Call args: ``emb`` [B, T, D], ``mask`` bool [B, T] (True = real item). Returns the state after every
    position [B, T, D]; the last one is the user. Causal, so training can use every position at once.
    Positions count from the window's first item (``cfg.stride > 0``) or back from its last (stride 0, bundles
    trained before windows had a stride).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.from_start = cfg.stride > 0
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim,
            cfg.n_heads,
            dim_feedforward=cfg.dim * 2,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.n_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, emb: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        if last_only and not self.training and not torch.is_grad_enabled():
            return self._infer_last(emb, mask)
        b, t, _ = emb.shape
        x = self.drop(emb * math.sqrt(emb.shape[-1]) + self.positions(mask))
        # Query i may see key j when j <= i and j is a real item; every position also sees itself, so that
        # padding rows (left of the history) never have an empty softmax.
        eye = torch.eye(t, dtype=torch.bool, device=emb.device)
        allowed = torch.ones(t, t, dtype=torch.bool, device=emb.device).tril() & mask.unsqueeze(1) | eye
        attn = torch.zeros(b, t, t, device=emb.device).masked_fill(~allowed, float("-inf"))
        attn = attn.repeat_interleave(self.n_heads, 0)
        layers: Any = self.blocks.layers
        if not last_only:
            for layer in layers:
                x = layer(x, src_mask=attn)
            return self.norm(x)
        # Serving and ingestion read only the last position: the final block attends from that one query.
        for layer in layers[:-1]:
            x = layer(x, src_mask=attn)
        last = layers[-1]
        kv = last.norm1(x)
        q = kv[:, -1:]
        sa = last.self_attn(q, kv, kv, key_padding_mask=~allowed[:, -1], need_weights=False)[0]
        y = x[:, -1:] + last.dropout1(sa)
        y = y + last._ff_block(last.norm2(y))
        return self.norm(y[:, -1])

    def positions(self, mask: Tensor) -> Tensor:
        """Position embeddings of left-padded rows: [B, T, D] counted from each row's first item, or [T, D] (shared
        by all rows) counted back from the last."""
        if not self.from_start:
            return self.pos[-mask.shape[1] :]
        return F.embedding((mask.cumsum(1) - 1).clamp(min=0), self.pos)

    def _infer_last(self, emb: Tensor, mask: Tensor) -> Tensor:
        """The last position's state [B, D] in eval mode: the same arithmetic as :meth:`forward` (pre-norm blocks,
        masked causal attention, last block from the last query only), written as direct functional calls.

        Serving and ingestion encode thousands of small chunks; the module path's per-call Python (fast-path
        checks, mask canonicalisation, head reshapes) cost as much as the arithmetic, and held the GIL that the
        consumer's other threads need. Equal to the module path up to float rounding (tested).
        """
        b, t, dim = emb.shape
        heads = self.n_heads
        hd = dim // heads
        x = torch.addcmul(self.positions(mask), emb, emb.new_tensor(math.sqrt(dim)))  # emb·√D + pos
        # [B, 1, T, T]: query i may see key j when j <= i and j is a real item, and always itself
        allowed = (torch.ones(t, t, dtype=torch.bool, device=emb.device).tril() & mask.unsqueeze(1)).unsqueeze(1)
        allowed |= torch.eye(t, dtype=torch.bool, device=emb.device)
        layers: Any = self.blocks.layers
        for layer in layers[:-1]:
            sa = layer.self_attn
            h = F.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            q, k, v = F.linear(h, sa.in_proj_weight, sa.in_proj_bias).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(b, t, dim)
            x = x + F.linear(o, sa.out_proj.weight, sa.out_proj.bias)
            x = x + feed_forward(layer, x)
        last = layers[-1]
        sa = last.self_attn
        h = F.layer_norm(x, (dim,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
        k, v = (
            F.linear(h, sa.in_proj_weight[dim:], sa.in_proj_bias[dim:]).view(b, t, 2, heads, hd).permute(2, 0, 3, 1, 4)
        )
        q = F.linear(h[:, -1], sa.in_proj_weight[:dim], sa.in_proj_bias[:dim]).view(b, heads, 1, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, :, -1:]).reshape(b, dim)
        y = x[:, -1] + F.linear(o, sa.out_proj.weight, sa.out_proj.bias)
        y = y + feed_forward(last, y)
        return F.layer_norm(y, (dim,), self.norm.weight, self.norm.bias, self.norm.eps)


def feed_forward(layer: nn.TransformerEncoderLayer, x: Tensor) -> Tensor:
    """The pre-norm feed-forward branch of an encoder layer in eval mode (no dropout)."""
    h = F.layer_norm(x, (x.shape[-1],), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return F.linear(
        layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias)),
        layer.linear2.weight,
        layer.linear2.bias,
    )


class GRU4RecEncoder(nn.Module):
    """One GRU layer over the real items of the history (padding skipped exactly via packing).

    Call args: ``emb`` [B, T, D], ``mask`` bool [B, T]. Returns the state after every position [B, T, D]
    (zeros at padding positions).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gru = nn.GRU(cfg.dim, cfg.dim, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, emb: Tensor, mask: Tensor, last_only: bool = False) -> Tensor:
        if last_only:
            return last_state(self.gru, self.drop(emb), mask)
        return all_states(self.gru, self.drop(emb), mask)


def _right_align_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """For left-padded rows: index so that position j of a right-padded row is item T - len + j."""
    lengths = mask.sum(1).clamp(min=1)
    t = mask.shape[1]
    idx = (torch.arange(t, device=mask.device).unsqueeze(0) + (t - lengths).unsqueeze(1)).clamp(max=t - 1)
    return idx, lengths


def _packed_run(gru: nn.GRU, emb: Tensor, mask: Tensor) -> tuple[nn.utils.rnn.PackedSequence, Tensor, Tensor, Tensor]:
    idx, lengths = _right_align_index(mask)
    right = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
    packed = nn.utils.rnn.pack_padded_sequence(right, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, h = gru(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    return out, h, idx, lengths


def last_state(gru: nn.GRU, emb: Tensor, mask: Tensor) -> Tensor:
    """Final GRU state over left-padded sequences, ignoring the padding. [B, T, D] → [B, H]."""
    return _packed_run(gru, emb, mask)[1][-1]


def all_states(gru: nn.GRU, emb: Tensor, mask: Tensor) -> Tensor:
    """GRU state after every position of left-padded sequences [B, T, D] → [B, T, H] (0 at padding)."""
    out, _, _, lengths = _packed_run(gru, emb, mask)
    right, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
    t = emb.shape[1]
    # back to left padding: left position p holds right position p - (T - len)
    src = torch.arange(t, device=emb.device).unsqueeze(0) - (t - lengths).unsqueeze(1)
    left = right.gather(1, src.clamp(min=0).unsqueeze(-1).expand(-1, -1, right.shape[-1]))
    return left * mask.unsqueeze(-1)


class DeviceModel(nn.Module):
    """The small sequential recommender that runs on a phone (METHOD.md §1).

    Args: ``cfg``. Call args of :meth:`forward`: ``history`` int64 [B, T] (left-padded),
    optional ``edit`` (:class:`Edit`). Returns scores [B, N] over the whole catalogue.
    The editable head is L dense D×D layers with tanh between them; an edit adds to their weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemTable(cfg.n_items, cfg.dim)
        self.encoder: nn.Module = SASRecEncoder(cfg) if cfg.encoder == "sasrec" else GRU4RecEncoder(cfg)
        self.head_weight = nn.Parameter(torch.stack([torch.eye(cfg.dim) for _ in range(cfg.n_edit_layers)]))
        self.head_bias = nn.Parameter(torch.zeros(cfg.n_edit_layers, cfg.dim))
        self.target = nn.Linear(cfg.dim, cfg.dim)
        with torch.no_grad():
            self.target.weight.copy_(torch.eye(cfg.dim))
            self.target.bias.zero_()
        self.repeat: RepeatPart | None = None
        if cfg.repeat_size > 0:
            # its own random stream: the rest of the model initialises (and trains) exactly as without it
            with torch.random.fork_rng():
                torch.manual_seed(torch.initial_seed() + 7919)
                self.repeat = RepeatPart(cfg.dim, cfg.repeat_form)

    def encode_all(self, history: Tensor) -> Tensor:
        """State after every position [B, T, D] of the history [B, T] (causal: for training)."""
        return self.encoder(self.items(history), history != PAD)

    def embed(self, ids: Tensor) -> Tensor:
        """Item embeddings [B, T, D] of ids [B, T]: through the TorchRec collection while training (shardable),
        straight from the table for inference (see :meth:`ItemTable.lookup`)."""
        return self.items(ids) if torch.is_grad_enabled() else self.items.lookup(ids)

    def encode(self, history: Tensor) -> Tensor:
        """User state h [B, D]: the state after the most recent item (only that one is computed)."""
        out: Tensor = self.encoder(self.embed(history), history != PAD, last_only=True)
        return out

    def head(self, h: Tensor, edit: Edit | None = None) -> Tensor:
        """Editable layers: [B, D] → [B, D]; ``W_l' = W_l + ΔW_l`` per session when edited."""
        x = h
        n = self.cfg.n_edit_layers
        for layer in range(n):
            w, b = self.head_weight[layer], self.head_bias[layer]
            if edit is None:
                x = x @ w.T + b
            else:
                x = torch.bmm((w + edit.weight[:, layer]), x.unsqueeze(-1)).squeeze(-1) + b + edit.bias[:, layer]
            if layer < n - 1:
                x = torch.tanh(x)
        return x

    def item_targets(self) -> Tensor:
        """t(E): [N, D]; cached by callers that score many requests with frozen weights."""
        return self.target(self.items.weight)

    def forward(
        self, history: Tensor, edit: Edit | None = None, targets: Tensor | None = None, repeats: Tensor | None = None
    ) -> Tensor:
        x = self.head(self.encode(history), edit)
        return self.scores_from_head(x, self.item_targets() if targets is None else targets, repeats)

    def scores_from_head(self, x: Tensor, targets: Tensor, repeats: Tensor | None = None) -> Tensor:
        """Scores [B, N] from (edited) head outputs x [B, D]: ``<x, t(E_i)>``, plus the repeat part's bias at the
        session's items when the model has one and ``repeats`` [B, R, W] are given."""
        scores = x @ targets.T
        bias = self.repeat_bias(x, targets, repeats, scores)
        return scores if bias is None else add_repeat_bias(scores, *bias)

    def repeat_bias(
        self, x: Tensor, targets: Tensor, repeats: Tensor | None, logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """(items [B, R], bias [B, R]) of the repeat part (:class:`recsys.repeats.RepeatPart`; ``logits`` = the
        explore scores ``x @ targets.T`` when computed already); ``None`` without it."""
        if self.repeat is None or repeats is None:
            return None
        out: tuple[Tensor, Tensor] = self.repeat(x, targets, repeats, logits)
        return out


# --------------------------------------------------------------------------------------------- cloud adapter


class CloudAdapter(nn.Module):
    """Hypernetwork: recent items → per-layer codes → clipped parameter edits (METHOD.md §2).

    It reads items through the device model's frozen item table, so cloud and device agree on items.
    Call args of :meth:`codes`: ``recent`` int64 [B, W] (left-padded). Returns codes [B, L, d].
    :meth:`edit_from_codes` maps codes [B, L, d] → :class:`Edit`. The generators are linear in the code
    with no offset (a departure from METHOD.md §2.3, where offsets start at 0 but then train): a zero code
    gives exactly the base model at all times, and a constant edit stays reachable through the layer codes'
    own bias.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, dim, n = cfg.code_dim, cfg.dim, cfg.n_edit_layers
        self.session_gru = nn.GRU(dim, dim, batch_first=True)
        self.to_code = nn.Linear(dim, d)
        self.layer_gru = nn.GRU(d, d, batch_first=True)  # cross-layer link: step l sees layer l-1's state
        self.to_layer_code = nn.Linear(d, d)
        if cfg.edit_rank > 0:
            r = cfg.edit_rank
            self.gen_scale = nn.Parameter(torch.randn(n, d, r) * 1e-2)
            self.factor_a = nn.Parameter(torch.randn(n, dim, r) / math.sqrt(dim))
            self.factor_b = nn.Parameter(torch.randn(n, r, dim) / math.sqrt(dim))
        else:
            self.gen_weight = nn.Parameter(torch.randn(n, d, dim * dim) * 1e-2)
        self.gen_bias = nn.Parameter(torch.randn(n, d, dim) * 1e-2)

    def session_code(self, recent_emb: Tensor, mask: Tensor) -> Tensor:
        """z [B, d] from embedded recent items [B, W, D]."""
        return self.to_code(last_state(self.session_gru, recent_emb, mask))

    def layer_codes(self, z: Tensor) -> Tensor:
        """Cross-layer transfer: z [B, d] fed at each of L steps → codes [B, L, d]."""
        steps = z.unsqueeze(1).expand(-1, self.cfg.n_edit_layers, -1)
        out, _ = self.layer_gru(steps)
        return torch.tanh(self.to_layer_code(out))

    def codes(self, recent_emb: Tensor, mask: Tensor) -> Tensor:
        return self.layer_codes(self.session_code(recent_emb, mask))

    def item_inputs(self, item_table: Tensor) -> Tensor:
        """The session GRU's input projections of every item [N, 3D] (gates r, z, n): an item's projection is the
        same wherever it appears, so inference computes it once per item instead of once per position."""
        gru = self.session_gru
        return F.linear(item_table, gru.weight_ih_l0, gru.bias_ih_l0)  # type: ignore[arg-type]

    def codes_from_inputs(self, recent: Tensor, inputs: Tensor) -> Tensor:
        """:meth:`codes` of the recent items ``recent`` [B, W] (left-padded ids) for inference, from
        :meth:`item_inputs`: the GRU's recurrence written out, skipping padding as packing does (exact)."""
        gru = self.session_gru
        x = F.embedding(recent, inputs)  # [B, W, 3D]
        real = recent != PAD
        real[:, -1] |= ~real.any(1)  # as packing does: an empty window reads its last (padding) position
        real = real.unsqueeze(-1)
        h = x.new_zeros(recent.shape[0], gru.hidden_size)
        for t in range(recent.shape[1]):
            i_r, i_z, i_n = x[:, t].chunk(3, 1)
            h_r, h_z, h_n = F.linear(h, gru.weight_hh_l0, gru.bias_hh_l0).chunk(3, 1)  # type: ignore[arg-type]
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = torch.where(real[:, t], n + z * (h - n), h)
        return self.layer_codes(self.to_code(h))

    def raw_edit(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Unclipped generator output for codes [B, L, d] → (ΔW [B, L, D, D], Δb [B, L, D])."""
        dim = self.cfg.dim
        if self.cfg.edit_rank > 0:
            s = torch.einsum("bld,ldr->blr", codes, self.gen_scale)
            dw = torch.einsum("lir,blr,lrj->blij", self.factor_a, s, self.factor_b)
        else:
            dw = torch.einsum("bld,ldk->blk", codes, self.gen_weight).view(*codes.shape[:2], dim, dim)
        return dw, torch.einsum("bld,ldk->blk", codes, self.gen_bias)

    def edit_from_codes(self, codes: Tensor, tau: float | None = None) -> Edit:
        """``ΔW_l = clip(G_l c_l, -τ, τ)``, ``Δb_l = clip(H_l c_l, -τ, τ)``."""
        t = self.cfg.tau if tau is None else tau
        dw, db = self.raw_edit(codes)
        none = torch.full((codes.shape[0],), -1, dtype=torch.long, device=codes.device)
        return Edit(dw.clamp(-t, t), db.clamp(-t, t), none)


# --------------------------------------------------------------------------------------------- prototypes


class PrototypeBank(nn.Module):
    """K centres in edit-code space, refined online by streaming k-means (METHOD.md §3).

    Buffers: ``centres`` [K, L, d], ``counts`` [K] (sessions assigned so far, for the step size),
    ``next_items`` [K, N]: the decayed counts of what each prototype's members chose next (the group bias, METHOD.md
    §3b: what the group did recently, which no single session can see).
    ``fine_centres`` [K2, L, d] and ``fine_items`` [K2, N]: the fine groups' centres and next-item distributions
    (``ModelConfig.fine_groups``; fixed after training, K2 = 0 without them).
    ``history_centres`` [G, D] and ``history_items`` [G, N]: the history groups' unit centres in item-embedding space
    and their next-item distributions (``ModelConfig.history_groups``; fixed after training, G = 0 without them).
    ``switches`` [K, 3] float64: each prototype's online switches for the edit and the group terms
    (:mod:`recsys.switch`; started on the validation period, all on before that).
    Parameters: ``weight_offset`` [K, L, D, D] and ``bias_offset`` [K, L, D], each prototype's own learned
    edit on top of what the shared generators make of its centre (zero-initialised, trained on its cluster in
    the alternating rounds): the "per-prototype conditioning" of METHOD.md §3 at the cost of one edit each.
    """

    centres: Tensor
    counts: Tensor
    next_items: Tensor
    fine_centres: Tensor
    fine_items: Tensor
    history_centres: Tensor
    history_items: Tensor
    switches: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, n, dim = cfg.n_prototypes, cfg.n_edit_layers, cfg.dim
        self.register_buffer("centres", torch.zeros(k, n, cfg.code_dim))
        self.register_buffer("counts", torch.zeros(k))
        self.register_buffer("next_items", torch.zeros(k, cfg.n_items))
        self.register_buffer("fine_centres", torch.zeros(cfg.fine_groups, n, cfg.code_dim))
        self.register_buffer("fine_items", torch.zeros(cfg.fine_groups, cfg.n_items))
        self.register_buffer("history_centres", torch.zeros(cfg.history_groups, dim))
        self.register_buffer("history_items", torch.zeros(cfg.history_groups, cfg.n_items))
        self.register_buffer("switches", neutral_switches(k))
        self.weight_offset = nn.Parameter(torch.zeros(k, n, dim, dim))
        self.bias_offset = nn.Parameter(torch.zeros(k, n, dim))

    def assign(self, codes: Tensor) -> Tensor:
        """Nearest centre (L2) for codes [B, L, d] → [B] int64."""
        flat = codes.reshape(codes.shape[0], -1)
        return torch.cdist(flat, self.centres.reshape(self.centres.shape[0], -1)).argmin(1)

    def distances(self, codes: Tensor, assignment: Tensor) -> Tensor:
        """Distance of each code [B, L, d] to its assigned centre → [B]."""
        return (codes - self.centres[assignment]).flatten(1).norm(dim=1)

    @torch.no_grad()
    def refine(self, codes: Tensor, assignment: Tensor) -> None:
        """Move the assigned centres toward codes [B, L, d] (see :func:`refine_centres`)."""
        refine_centres(self.centres, self.counts, codes, assignment, self.cfg)

    @torch.no_grad()
    def observe(self, prototypes: Tensor, targets: Tensor) -> None:
        """Count the next items ``targets`` [B] of sessions in ``prototypes`` [B] (:func:`count_next_items`)."""
        count_next_items(self.next_items, prototypes, targets, self.cfg.group_bias_decay)

    def item_bias(self, prototypes: Tensor, codes: Tensor | None, groups: Tensor | None = None) -> Tensor | None:
        """The group bias [B, N] of sessions assigned to ``prototypes`` [B] (:func:`group_bias`), plus the fine groups'
        of their ``codes`` [B, L, d] when given (:func:`fine_group_bias`), plus their history groups' ``groups`` [B]
        when given (:func:`history_group_bias`); ``None`` when all are off."""
        bias = group_bias(self.next_items, prototypes, self.cfg)
        if codes is not None:
            bias = add_bias(bias, fine_group_bias(codes, prototypes, self.fine_centres, self.fine_items, self.cfg))
        if groups is not None and (rows := history_bias_rows(self.history_items, self.cfg)) is not None:
            bias = add_bias(bias, history_group_bias(groups, prototypes, rows))
        return bias

    def has_history_groups(self) -> bool:
        """Whether prototype-mode scores add the history groups' bias."""
        return self.cfg.history_bias_weight > 0 and self.history_centres.shape[0] > 0

    @torch.no_grad()
    def fit(self, codes: Tensor, *, iters: int = 25, seed: int = 0) -> Tensor:
        """k-means++ initialisation + Lloyd iterations on codes [M, L, d]; returns the assignment [M]."""
        flat = codes.reshape(codes.shape[0], -1)
        k = self.cfg.n_prototypes
        g = torch.Generator().manual_seed(seed)
        first = int(torch.randint(flat.shape[0], (1,), generator=g))
        centres = [flat[first]]
        d2 = (flat - centres[0]).pow(2).sum(1)
        for _ in range(1, k):
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))
            nxt = int(torch.multinomial(probs, 1, generator=g))
            centres.append(flat[nxt])
            d2 = torch.minimum(d2, (flat - flat[nxt]).pow(2).sum(1))
        mu = torch.stack(centres)
        assignment = torch.cdist(flat, mu).argmin(1)
        for _ in range(iters):
            for j in range(k):
                members = flat[assignment == j]
                if len(members):
                    mu[j] = members.mean(0)
            new = torch.cdist(flat, mu).argmin(1)
            if torch.equal(new, assignment):
                break
            assignment = new
        self.centres.copy_(mu.view_as(self.centres))
        self.counts.copy_(torch.bincount(assignment, minlength=k).float())
        return assignment


@torch.no_grad()
def refine_centres(centres: Tensor, counts: Tensor, codes: Tensor, assignment: Tensor, cfg: ModelConfig) -> None:
    """Streaming k-means in place, one code at a time in order: ``μ_k ← μ_k + η_k (c − μ_k)``.

    ``η_k = max(1 / (n_k + n0), floor)``: early sessions move a centre a lot, later ones less, and the
    floor keeps every prototype adapting under drift. centres [K, L, d], counts [K], codes [B, L, d].
    The in-order recurrence is applied in closed form per prototype (a weighted sum of its codes), so a
    batch costs O(K) tensor operations instead of a Python step per code.
    """
    for k in assignment.unique().tolist():
        mine = codes[assignment == k].double()  # this prototype's codes, in arrival order
        steps = torch.arange(mine.shape[0], dtype=torch.float64)
        eta = (1.0 / (float(counts[k]) + steps + cfg.proto_n0)).clamp(min=cfg.proto_eta_floor)
        keep = torch.flip(torch.cumprod(torch.flip(1.0 - eta, [0]), 0), [0])  # Π_{i >= j} (1 − η_i)
        after = torch.cat([keep[1:], keep.new_ones(1)])  # Π_{i > j} (1 − η_i)
        weights = (eta * after).view(-1, *([1] * (mine.dim() - 1)))
        centres[k] = (keep[0] * centres[k].double() + (weights * mine).sum(0)).to(centres.dtype)
        counts[k] += mine.shape[0]


def group_bias(next_items: Tensor, prototypes: Tensor, cfg: ModelConfig) -> Tensor | None:
    """``β · log1p(n_ki / (α · n̄_k))`` [B, N] for sessions assigned to ``prototypes`` [B] (-1 = none: no bias).

    ``n_k`` = the prototype's decayed next-item counts (``next_items`` [K, N]), ``n̄_k`` their mean per item.
    Up to a per-row constant this is β times the log of the group's smoothed next-item distribution
    ``(n_ki + α n̄_k) / Σ(…)``, so the ranking is the base model's log-linear blend with what the group chose; a
    prototype with no counts adds exactly 0. ``None`` when β = 0 (the model without a group bias).
    """
    beta = cfg.group_bias_weight
    if beta == 0.0:
        return None
    rows = next_items[prototypes.clamp(min=0)]
    mean = rows.mean(dim=1, keepdim=True)
    scale = torch.where(mean > 0, 1.0 / (cfg.group_bias_smoothing * mean).clamp(min=1e-30), torch.zeros_like(mean))
    bias = torch.log1p(rows * scale) * beta
    return bias * (prototypes >= 0).unsqueeze(1)


#: A session's soft membership reaches its this many nearest fine groups: the weights beyond are negligible at the
#: temperatures validation chooses (test NDCG@10 within 0.3 % of all groups' on both seeds, docs/results.md, "Fine
#: groups"), and a product with all 512 groups cost 23 ms for a consumer batch's 250 predictions (N = 1,322).
FINE_NEAREST = 8


def fine_weights(sq_distances: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Soft membership of codes in the fine groups from their squared distances [B, K2]: (groups [B, m], weights
    [B, m]) over each row's m = min(:data:`FINE_NEAREST`, K2) nearest groups, ``softmax(−(d² − min d²) / (τ ·
    median d²))`` with the median over all K2 groups (torch's: the lower middle value), so τ is relative to the
    row's own spread of distances. τ = 0: the nearest group alone, weight 1."""
    if temperature == 0.0:
        nearest = sq_distances.argmin(1, keepdim=True)
        return nearest, torch.ones(nearest.shape, dtype=sq_distances.dtype)
    m = min(FINE_NEAREST, sq_distances.shape[1])
    values, groups = sq_distances.topk(m, dim=1, largest=False)  # ascending: values[:, 0] is the nearest
    scale = lower_median(sq_distances).clamp(min=1e-12)
    return groups, torch.softmax(-(values - values[:, :1]) / (temperature * scale), dim=1)


def lower_median(rows: Tensor) -> Tensor:
    """Each row's lower middle value [B, 1] of ``rows`` [B, K], exactly as ``torch.median(dim=1)`` gives it, by
    NumPy's partition: the same order statistic, about 5 × faster for 2,048 fine groups (measured: 2.1 ms against
    11.4 ms for 250 rows on one core)."""
    k = (rows.shape[1] - 1) // 2
    return torch.from_numpy(np.partition(rows.detach().cpu().numpy(), k, axis=1)[:, k : k + 1])


def fine_sq_distances(codes: Tensor, centres: Tensor) -> Tensor:
    """Squared distances [B, K2] of codes [B, L, d] to the fine groups' centres [K2, L, d], as
    ``(|c|² − 2 c·μ) + |μ|²`` in float64 (clamped at 0): one product with every centre, and exact enough that the
    single-row NumPy path (:mod:`recsys.fine_rows`) picks the same groups and weights."""
    flat = codes.reshape(codes.shape[0], -1).double()
    cen = centres.reshape(centres.shape[0], -1).double()
    return (flat.pow(2).sum(1, keepdim=True) - 2.0 * (flat @ cen.T) + cen.pow(2).sum(1)).clamp(min=0.0)


def fine_nearest(codes: Tensor, centres: Tensor) -> Tensor:
    """The nearest fine group [B] of each code [B, L, d], by :func:`fine_sq_distances`: the group a session's next
    item is counted in during training is the group that weighs most when it is served."""
    return fine_sq_distances(codes, centres).argmin(1)


def fine_group_bias(
    codes: Tensor, prototypes: Tensor, centres: Tensor, items: Tensor, cfg: ModelConfig
) -> Tensor | None:
    """``β2 · log1p(Σ_f w_f P_f(i) · N / α2)`` [B, N] for codes [B, L, d] (:func:`fine_weights` over the fine
    groups' ``centres`` [K2, L, d], their next-item distributions ``items`` [K2, N]); 0 for a session without a
    prototype (-1 in ``prototypes``: it gets the base model). ``None`` when the model has no fine groups.

    Like the prototypes' group bias it is, up to a per-row constant, β2 times the log of a smoothed next-item
    distribution, here the one of the session's finer neighbourhood in code space: what sessions like it chose next.
    """
    beta = cfg.fine_bias_weight
    if beta == 0.0 or centres.shape[0] == 0:
        return None
    groups, weights = fine_weights(fine_sq_distances(codes, centres), cfg.fine_temperature)
    weights = weights.to(items.dtype)
    mix = items[groups[:, 0]] * weights[:, :1]
    for j in range(1, groups.shape[1]):  # row by row of the nearest groups: [B, N] at a time, not [B, m, N]
        mix += items[groups[:, j]] * weights[:, j : j + 1]
    return distribution_bias(mix, beta, cfg.fine_bias_smoothing) * (prototypes >= 0).unsqueeze(1)


def next_item_distributions(counts: Tensor) -> Tensor:
    """Each group's next-item distribution [G, N] from its next-item counts [G, N], in their dtype (a group without
    members: zeros, so no bias): what the fine and the history groups store after training."""
    return counts / counts.sum(1, keepdim=True).clamp(min=1.0)


def distribution_bias(distributions: Tensor, weight: float, smoothing: float) -> Tensor:
    """``β · log1p(P(i) · N / α)`` [B, N] of next-item distributions [B, N]: up to a per-row constant, β times the log
    of ``P`` smoothed by α/N per item (the fine and the history groups' form; :func:`group_bias`'s on counts)."""
    return torch.log1p(distributions * (distributions.shape[1] / smoothing)) * weight


def window_sums(items: Tensor, histories: Tensor) -> Tensor:
    """The sum [B, D] float64 of the item embeddings ``items`` [N, D] over each history window [B, T] (PAD left out):
    the history groups' key, up to its length (their nearest centre by cosine is the same for the sum and the mean).
    In float64, so that the single-row NumPy path (:mod:`recsys.history_rows`) picks the same groups."""
    return (items[histories].double() * (histories != PAD).unsqueeze(-1)).sum(1)


def nearest_history_groups(sums: Tensor, centres: Tensor) -> Tensor:
    """The nearest history group [B] (largest cosine with the unit ``centres`` [G, D], in float64) of window sums
    [B, D] (:func:`window_sums`); -1 for an empty window."""
    nearest = (sums.double() @ centres.double().T).argmax(1)
    return torch.where(sums.abs().sum(1) > 0, nearest, torch.full_like(nearest, -1))


def history_bias_rows(distributions: Tensor, cfg: ModelConfig) -> Tensor | None:
    """Each history group's bias row ``β3 · log1p(P_g(i) · N / α3)`` [G, N] from its next-item distribution
    ``distributions`` [G, N] (:func:`distribution_bias`); ``None`` when the model has no history groups. Fixed after
    training, so a server computes them once (:mod:`recsys.history_rows`)."""
    beta = cfg.history_bias_weight
    if beta == 0.0 or distributions.shape[0] == 0:
        return None
    return distribution_bias(distributions, beta, cfg.history_bias_smoothing)


def history_group_bias(groups: Tensor, prototypes: Tensor, rows: Tensor) -> Tensor:
    """The bias [B, N] of sessions in history groups ``groups`` [B]: their group's row of ``rows`` [G, N]
    (:func:`history_bias_rows`); 0 for a session without a prototype (-1 in ``prototypes``: it gets the base model)
    or without a group (-1: an empty window)."""
    return rows[groups.clamp(min=0)] * ((prototypes >= 0) & (groups >= 0)).unsqueeze(1)


def add_bias(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The sum of two optional item biases [B, N] (``None`` = none)."""
    if a is None:
        return b
    return a if b is None else a + b


@torch.no_grad()
def count_next_items(next_items: Tensor, prototypes: Tensor, targets: Tensor, decay: float) -> None:
    """In place, in event order: ``n_k ← γ n_k + onehot(target)`` for each session's prototype k (METHOD.md §3b).

    The decay counts member events, so every prototype forgets at the pace of its own traffic. ``next_items``
    [K, N], ``prototypes`` [B] (-1 = none: not counted), ``targets`` [B] item indices. O(K') tensor operations
    per batch (K' = prototypes present), whatever B.
    """
    for k in prototypes.unique().tolist():
        if k < 0:
            continue
        mine = targets[prototypes == k]
        m = mine.shape[0]
        weights = torch.pow(decay, torch.arange(m - 1, -1, -1, dtype=torch.float64)).to(next_items.dtype)
        if decay != 1.0:
            next_items[k] *= decay**m
        next_items[k].index_add_(0, mine, weights)


@torch.no_grad()
def reseed_idle(centres: Tensor, counts: Tensor, idle: Tensor, codes: Tensor, distances: Tensor) -> list[int]:
    """Idle prototypes restart at the codes of the worst-served sessions (largest distance to their centre).

    A prototype that receives nothing for a long window serves nobody; moving it onto the sessions the bank
    fits worst lets new user groups (a real-time shift) get a prototype of their own. In place;
    idle bool [K], codes [B, L, d], distances [B]. Returns the re-seeded prototype ids.
    """
    idle_ids = idle.nonzero().flatten().tolist()
    worst = distances.argsort(descending=True).tolist()
    reseeded = []
    for k, i in zip(idle_ids, worst, strict=False):
        centres[k] = codes[i]
        counts[k] = 0
        reseeded.append(k)
    return reseeded


# --------------------------------------------------------------------------------------------- the whole


class PersonaModel(nn.Module):
    """Device model + cloud adapter + prototype bank, with the three ways to edit a session.

    - ``session_edit(history, mode="prototype")``: prototype edit + clipped residual (Persona);
    - ``mode="session"``: the adapter's edit from the session code alone (no prototypes, DUET-like);
    - no edit: the base model.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.device_model = DeviceModel(cfg)
        self.adapter = CloudAdapter(cfg)
        self.bank = PrototypeBank(cfg)

    def recent(self, history: Tensor) -> Tensor:
        """The adapter's window: the last ``adapter_window`` positions of the history [B, T] → [B, W]."""
        return history[:, -self.cfg.adapter_window :]

    def codes(self, history: Tensor) -> Tensor:
        """Edit codes [B, L, d] of the sessions whose histories are [B, T]."""
        recent = self.recent(history)
        emb = self.device_model.embed(recent)
        return self.adapter.codes(emb, recent != PAD)

    def edit_for(
        self, codes: Tensor, mode: Literal["session", "prototype"] = "prototype", history: Tensor | None = None
    ) -> Edit:
        """Edits from codes [B, L, d]. In prototype mode also returns each session's prototype, and its history group
        when the sessions' ``history`` windows [B, T] are given (:meth:`history_groups`)."""
        if mode == "session":
            return self.adapter.edit_from_codes(codes)
        edit = self.prototype_edit(codes, self.bank.centres, self.bank.assign(codes))
        return edit if history is None else edit._replace(groups=self.history_groups(history))

    def history_groups(self, history: Tensor) -> Tensor | None:
        """The nearest history group [B] of each window [B, T] (-1: empty); ``None`` when the model has none."""
        if not self.bank.has_history_groups():
            return None
        return nearest_history_groups(window_sums(self.device_model.items.weight, history), self.bank.history_centres)

    def prototype_edits(self, centres: Tensor, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The clipped edits ``clip(G μ_k + O_k, ±τ)`` of prototypes ``ids`` (all K by default).

        Returns (ΔW [K', L, D, D], Δb [K', L, D]). They depend on the bank alone, so serving computes them once
        per bank snapshot instead of once per request.
        """
        k = torch.arange(centres.shape[0], device=centres.device) if ids is None else ids
        t = self.cfg.tau
        w, b = self.adapter.raw_edit(centres[k])
        return (w + self.bank.weight_offset[k]).clamp(-t, t), (b + self.bank.bias_offset[k]).clamp(-t, t)

    def prototype_edit(
        self, codes: Tensor, centres: Tensor, prototypes: Tensor, bank_edits: tuple[Tensor, Tensor] | None = None
    ) -> Edit:
        """Prototype edit + clipped session residual, for codes [B, L, d], centres [K, L, d], ids [B]:

        ``clip(G μ_k + O_k, ±τ) + clip(λ G (c − μ_k), ±τ_r)`` with ``O_k`` the prototype's learned offset and
        λ (``residual_weight``, chosen on validation) shrinking each session's edit toward its group's.
        A session sitting on its centre gets exactly its prototype's model. ``bank_edits`` are
        :meth:`prototype_edits` of all of ``centres``, when the caller has them already.
        """
        rt = self.cfg.residual_tau
        if bank_edits is None:
            # A prototype's edit is the same for all of its sessions: generate it once per prototype in the
            # batch (K ≪ B); indexing keeps gradients exact for training.
            used, which = torch.unique(prototypes, return_inverse=True)
            proto_w, proto_b = self.prototype_edits(centres, used)
        else:
            (proto_w, proto_b), which = bank_edits, prototypes
        res_w, res_b = self.adapter.raw_edit((codes - centres[prototypes]) * self.cfg.residual_weight)
        return Edit(proto_w[which] + res_w.clamp(-rt, rt), proto_b[which] + res_b.clamp(-rt, rt), prototypes, codes)

    def session_edit(self, history: Tensor, mode: Literal["session", "prototype"] = "prototype") -> Edit:
        return self.edit_for(self.codes(history), mode, history)

    def score(
        self,
        history: Tensor,
        edit: Edit | None = None,
        targets: Tensor | None = None,
        repeats: Tensor | None = None,
    ) -> Tensor:
        """Scores [B, N] of the (edited) device model; ``targets`` = cached ``item_targets()``; ``repeats`` = the
        sessions' item counts [B, R, W] for the repeat part. An edit with prototypes (prototype mode) adds their
        group bias (:func:`group_bias`); base and session edits do not."""
        scores: Tensor = self.device_model(history, edit, targets, repeats)
        bias = None if edit is None else self.bank.item_bias(edit.prototype, edit.codes, edit.groups)
        return scores if bias is None else scores + bias

    def term_scores(
        self, history: Tensor, edit: Edit, targets: Tensor | None = None, repeats: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The parts the online switches choose from (:mod:`recsys.switch`): the edited and the plain device model's
        scores [B, N] and the group terms [B, N] of a prototype-mode ``edit`` (``None``: the model has none). The
        history is encoded once for both heads: the encoder is most of the work."""
        dm = self.device_model
        states, items = dm.encode(history), dm.item_targets() if targets is None else targets
        edited = dm.scores_from_head(dm.head(states, edit), items, repeats)
        plain = dm.scores_from_head(dm.head(states, None), items, repeats)
        return edited, plain, self.bank.item_bias(edit.prototype, edit.codes, edit.groups)

    def freeze_device_model(self) -> None:
        for p in self.device_model.parameters():
            p.requires_grad_(False)


def cross_entropy(scores: Tensor, targets: Tensor) -> Tensor:
    """Next-item loss over the full catalogue; padding and unknown never count as answers."""
    scores = scores.clone()
    scores[:, PAD] = float("-inf")
    scores[:, UNK] = float("-inf")
    return F.cross_entropy(scores, targets)


def edit_norm_ratio(model: PersonaModel, edit: Edit) -> Tensor:
    """‖ΔW‖ / ‖W‖ per session [B]: how far an edit moves the head (a drift signal)."""
    base = model.device_model.head_weight.norm()
    return edit.weight.flatten(1).norm(dim=1) / base.clamp(min=1e-12)

"""M3BSR (Cui et al., SIGIR 2025): the paper in one file, read top to bottom.

.. code-block:: text

    items (B, S, L+1) --embed--> h[m] (B, S, L+1, d)     per modality m in {id, image, text}, level s
        1. CDMD   image/text streams of every level denoised by a conditional chain on the ID stream
        2. CDBD   each shallower level denoised by a conditional chain on the next deeper level
        3. MEIE   specific experts (one Transformer per modality) + a common expert (cross-attention
                  shallow -> deep, then a Transformer), pooled at each target's history index,
                  disentangled by a contrastive loss and mixed by a router into y (B, K, d)
        4. logits p(i | y) = softmax(W y + b) over all items (the base class)

Time causality (protocol): a target at time tau only ever sees events strictly before tau. Every
stream runs causally within a window of L = ``max_len`` events (position i sees BOS and positions
i-L < j <= i of its own level, :func:`~m3bsr.models.layers.window_mask`); a query of a shallower
level at time tau sees the last L deeper-level events strictly before tau
(:func:`~m3bsr.models.layers.before_mask`); each expert is read at the history index of its level
(:func:`~m3bsr.data.sequences.history_index`), so all K targets of a row train in one pass and each
reads the last L events of every level, as an evaluation row does. Positions are counted back from a
stream's newest event (:func:`~m3bsr.data.sequences.position_ids`). Method details and the flags for
every choice: ``docs/method.md``.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CHOICES, ConfigError, ModelConfig
from ..data.sequences import history_index, position_ids
from .base import DataInfo, Recommender
from .diffusion import ConditionalChain
from .layers import Attention, FeatureProjection, Positions, Transformer, before_mask, window_mask

log = logging.getLogger(__name__)

FEATURE_MODALITIES = ("image", "text")


def level_weights(valid: torch.Tensor) -> torch.Tensor:
    """``valid`` ``(B, S', L)`` -> float loss weights: a mean over each level's valid positions,
    summed over the S' levels (so a loss over stacked levels is the sum of per-level means)."""
    v = valid.float()
    return v / v.sum((0, 2), keepdim=True).clamp(min=1)


def contrastive_apart(z: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's disentanglement loss over the E pooled interests of each target.

    ``L = - sum_{i != j} log( exp(sim(h_i, h_j) / tau) / sum_{k != i} exp(sim(h_i, h_k) / tau) )``,
    sim = cosine. ``z`` ``(..., E, d)`` -> ``(...)`` (float32). Note: for each i the sum over j of
    log-probabilities is largest when the similarities to all other experts are equal, so its
    minimum, E (E - 1) log(E - 1), is reached by equal (not necessarily small) similarities.
    """
    z = F.normalize(z.float(), dim=-1)
    E = z.shape[-2]
    eye = torch.eye(E, dtype=torch.bool, device=z.device)
    logp = (z @ z.transpose(-1, -2) / tau).masked_fill(eye, float("-inf")).log_softmax(-1)
    return -logp.masked_fill(eye, 0.0).sum((-1, -2))


def contrastive_push(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The "push" variant: InfoNCE across two dropout views of the experts.

    Anchor h_i (view 1), positive h'_i (the same expert in view 2), negatives h'_k (the other
    experts in view 2): ``L = - sum_i log( exp(sim(h_i, h'_i)/tau) / sum_k exp(sim(h_i, h'_k)/tau) )``.
    ``z1``, ``z2`` ``(..., E, d)`` -> ``(...)`` (float32).
    """
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    logp = (z1 @ z2.transpose(-1, -2) / tau).log_softmax(-1)
    return -logp.diagonal(dim1=-2, dim2=-1).sum(-1)


class M3BSR(Recommender):
    """Multi-modal multi-behaviour sequential recommender with conditional diffusion denoising.

    ``self.modalities``: the active streams (``"id"`` first, then the available requested
    features); ``self.skipped``: human-readable notes on components switched off by the config or
    missing from the data (also logged once at construction).
    """

    def __init__(self, cfg: ModelConfig, info: DataInfo):
        super().__init__(cfg, info)
        d, S = cfg.d, info.n_levels
        self.skipped: list[str] = []
        self._check(cfg)
        wanted = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
        if "id" not in wanted:
            raise ConfigError(f"modalities={cfg.modalities!r} must include 'id' (it conditions CDMD)")
        for m in wanted:
            if m not in ("id",) + FEATURE_MODALITIES:
                raise ConfigError(f"unknown modality {m!r} in modalities={cfg.modalities!r}")
        self.features = [m for m in FEATURE_MODALITIES if m in wanted and m in info.features]
        self.skipped += [f"{m} stream: the dataset has no {m} features"
                         for m in FEATURE_MODALITIES if m in wanted and m not in info.features]
        self.modalities = ["id"] + self.features
        M = len(self.modalities)

        # ---- embeddings: h^id = MLP(ID embedding); h^im, h^te = projections of frozen features
        self.item = nn.Embedding(info.n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item.weight, std=0.02)
        # The table is tied to the output layer, so it starts small (std 0.02); its lookups enter the
        # MLP scaled by sqrt(d) (as Vaswani et al. do with a tied table), and the MLP's biases start at
        # zero: with PyTorch's default biases (~U(+-1/8)) every item's LN(MLP(e)) began 99.8 % cosine-
        # identical and the ID stream carried almost no item identity.
        self.id_mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        for layer in (self.id_mlp[0], self.id_mlp[2]):
            nn.init.zeros_(layer.bias)
        self.proj = nn.ModuleDict({m: FeatureProjection(info.features[m], info.feature_mask[m], d)
                                   for m in self.features})
        self.bos = nn.Parameter(torch.randn(S, M, d) * 0.02)  # one BOS token per (level, modality) stream
        # every stream is LayerNormed: unit-scale elements, the scale the N(0, I) diffusion noise assumes
        self.emb_ln = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.drop = nn.Dropout(cfg.dropout)

        # ---- 1. CDMD: one chain (own noise predictor) per feature modality, shared by the levels
        self.cdmd = None
        if not cfg.cdmd:
            self.skipped.append("CDMD: off (cdmd=False)")
        elif not self.features:
            self.skipped.append("CDMD: no image/text modality to denoise")
        else:
            self.cdmd = nn.ModuleDict({m: ConditionalChain(cfg, d, seed=1 + i) for i, m in enumerate(self.features)})

        # ---- 2. CDBD: one chain per modality, shallower levels conditioned on deeper ones
        self.cdbd = None
        if not cfg.cdbd:
            self.skipped.append("CDBD: off (cdbd=False)")
        elif S < 2:
            self.skipped.append("CDBD: a single behaviour level has nothing deeper to condition on")
        else:
            self.cdbd = nn.ModuleDict({m: ConditionalChain(cfg, d, seed=11 + i) for i, m in enumerate(self.modalities)})

        # ---- 3. MEIE: specific experts, common expert, router
        self.window = info.window  # L: every attention sees the last L events of a level
        self.pos = Positions(d)  # added at the expert inputs (the diffusion sees content only)
        spec = (self.modalities if cfg.shared_specific else [f"{s}/{m}" for s in range(S) for m in self.modalities])
        self.specific = nn.ModuleDict({k: Transformer(d, cfg.layers, cfg.heads, cfg.dropout) for k in spec})
        self.common = None
        if not cfg.common_expert:
            self.skipped.append("common expert: off (common_expert=False)")
        elif S < 2:
            self.skipped.append("common expert: a single behaviour level has no shallow -> deep pair")
        else:
            self.type_emb = nn.Parameter(torch.randn(M, d) * 0.02)  # modality-type embeddings
            self.ln_cl, self.ln_fa = nn.LayerNorm(d), nn.LayerNorm(d)
            self.common_cross = Attention(d, cfg.heads, cfg.dropout)  # h^share = h_cl + CrossAttention(h_cl, h_fa)
            self.common = Transformer(d, cfg.layers, cfg.heads, cfg.dropout)  # h_common = Transformer(h^share)
        n_spec = S * M
        self.n_experts = n_spec + (self.common is not None)
        if not cfg.contrastive:
            self.skipped.append("contrastive loss: off (contrastive=False)")
        self.gate = self.spec_proj = self.router = None
        if cfg.router == "gate":
            self.spec_proj = nn.Linear(n_spec * d, d)  # W_s
            if self.common is not None:
                self.gate = nn.Linear(self.n_experts * d, d)  # W_g, b_g
            else:
                self.skipped.append("router gate: no common expert to gate, y = W_s [h_spec]")
        elif cfg.router == "softmax":
            self.router = nn.Linear(self.n_experts * d, self.n_experts)
        else:
            self.skipped.append("router: plain mean of the experts (router='mean')")

        # ---- 4. prediction: the base class's Linear, or W tied to the ID embedding table
        if cfg.tie_weights:
            del self.out
            self.out_bias = nn.Parameter(torch.zeros(info.n_items + 1))
        for note in self.skipped:
            log.info("M3BSR: %s", note)

    @staticmethod
    def _check(cfg: ModelConfig) -> None:
        """Reject unknown choices even when a ModelConfig was built without ``Config.set``."""
        for key in ("cdbd_condition", "cdbd_deeper", "contrastive_variant", "router"):
            if getattr(cfg, key) not in CHOICES[key]:
                raise ConfigError(f"config field {key!r} must be one of {CHOICES[key]}, got {getattr(cfg, key)!r}")

    # -----------------------------------------------------------------------------------------
    # Embeddings
    # -----------------------------------------------------------------------------------------

    def id_embedding(self, items: torch.Tensor) -> torch.Tensor:
        """``h^id = MLP(sqrt(d) e_i)``: item ids ``(...)`` -> ``(..., d)`` (before the stream's LayerNorm)."""
        return self.id_mlp(self.item(items) * math.sqrt(self.cfg.d))

    def embed(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """items ``(B, S, L+1)`` -> {modality: ``(B, S, L+1, d)``}: ``LN_m([BOS; h^m])``, dropped out.

        When a batch holds more positions than the catalogue has items, the item table is encoded
        once and looked up (same result, less work).
        """
        B, S, L1 = items.shape
        whole = items.numel() > self.n_items + 1
        ids = torch.arange(self.n_items + 1, device=items.device) if whole else items
        h = {}
        for i, m in enumerate(self.modalities):
            x = self.id_embedding(ids) if m == "id" else self.proj[m](ids)
            if whole:
                x = x[items]
            bos = self.bos[:, i][None, :, None].expand(B, S, 1, -1).to(x.dtype)
            h[m] = self.drop(self.emb_ln[m](torch.cat([bos, x[:, :, 1:]], 2)))
        return h

    # -----------------------------------------------------------------------------------------
    # 1. CDMD: ID conditions image and text, per level, same-stream causal
    # -----------------------------------------------------------------------------------------

    def modality_denoising(self, h: dict[str, torch.Tensor], valid: torch.Tensor,
                           rec: dict | None = None) -> torch.Tensor | None:
        """For every level b and m in {image, text}: ``h^{b,m} <- Chain_m(h^{b,m} | h^{b,id})`` in place.

        Position i of the noisy stream attends ID positions i-L < j <= i of the same level (causal,
        windowed) and BOS.
        The levels are stacked on the batch axis (one chain call per modality). Returns L_m
        (the sum over modalities and levels; None in eval).
        """
        B, S, L1, d = h["id"].shape
        cond = h["id"].reshape(B * S, L1, d)
        weight = level_weights(valid).reshape(B * S, L1)
        windowed = self.window is not None and L1 > self.window + 1  # training rows longer than L
        mask = window_mask(L1, self.window, cond.device) if windowed else None
        loss = None
        for m in self.features:
            r = self.cdmd[m](h[m].reshape(B * S, L1, d), cond, mask=mask, causal=not windowed, weight=weight,
                             return_states=rec is not None)
            h[m] = r.out.view(B, S, L1, d)
            loss = r.loss if loss is None else loss + r.loss
            if rec is not None:  # rows are user-major (B, S): unflatten to (B, S, ...)
                rec["chains"][f"cdmd/{m}"] = {"levels": list(range(S)),
                                              "states": [x.unflatten(0, (B, S)) for x in r.states],
                                              "weights": [w.unflatten(0, (B, S)) for w in r.weights]}
        return loss

    # -----------------------------------------------------------------------------------------
    # 2. CDBD: the deeper level conditions the shallower one, time-aware
    # -----------------------------------------------------------------------------------------

    def _cdbd_condition_levels(self, s: int, S: int) -> list[int]:
        """Levels that condition level s: the next deeper one, or (cdbd_deeper='all') every deeper one."""
        return [s + 1] if self.cfg.cdbd_deeper == "next" else list(range(s + 1, S))

    def behaviour_denoising(self, h: dict[str, torch.Tensor], times: torch.Tensor, valid: torch.Tensor,
                           rec: dict | None = None) -> torch.Tensor | None:
        """For every level s < S-1 and modality m: ``h^{s,m} <- Chain_m(h^{s,m} | h^{deeper, m})``.

        Condition: the same modality of the deeper level(s) (``cdbd_condition='concat'``: all their
        modalities concatenated along the sequence axis), with a time-aware mask (a query at time
        tau sees the last L condition events strictly before tau). Every level is conditioned on the deeper
        streams as they leave CDMD (levels run in parallel, not as a cascade); the deep level
        passes unchanged. Levels with equally long conditions share one chain call (stacked on
        the batch axis). Returns L_b (None in eval).
        """
        B, S, L1, d = h["id"].shape
        n_cond = 1 if self.cfg.cdbd_condition == "same" else len(self.modalities)
        groups: dict[int, list[int]] = {}  # condition length -> levels
        for s in range(S - 1):
            groups.setdefault(len(self._cdbd_condition_levels(s, S)) * n_cond * L1, []).append(s)
        new = {m: list(h[m].unbind(1)) for m in self.modalities}
        loss = None
        for levels in groups.values():
            deeper = [self._cdbd_condition_levels(s, S) for s in levels]
            q_times = torch.cat([times[:, s] for s in levels], 0)
            c_times = torch.cat([torch.cat([times[:, l] for l in ls] * n_cond, 1) for ls in deeper], 0)
            mask = before_mask(q_times, c_times, self.window, L1)
            weight = level_weights(valid[:, levels]).transpose(0, 1).reshape(len(levels) * B, L1)
            for m in self.modalities:
                cm = [m] if self.cfg.cdbd_condition == "same" else self.modalities
                x = torch.cat([h[m][:, s] for s in levels], 0)
                cond = torch.cat([torch.cat([h[c][:, l] for c in cm for l in ls], 1) for ls in deeper], 0)
                r = self.cdbd[m](x, cond, mask=mask, weight=weight, return_states=rec is not None)
                for j, s in enumerate(r.out.split(B, 0)):
                    new[m][levels[j]] = s
                loss = r.loss if loss is None else loss + r.loss
                if rec is not None:  # rows are level-major (levels, B): to (B, levels, ...)
                    S_ = len(levels)
                    rec["chains"][f"cdbd/{m}/" + ",".join(map(str, levels))] = {
                        "levels": levels, "states": [x.unflatten(0, (S_, B)).transpose(0, 1) for x in r.states],
                        "weights": [w.unflatten(0, (S_, B)).transpose(0, 1) for w in r.weights]}
        for m in self.modalities:
            h[m] = torch.stack(new[m], 1)
        return loss

    # -----------------------------------------------------------------------------------------
    # 3. MEIE: experts pooled at each target's history index
    # -----------------------------------------------------------------------------------------

    def experts(self, h: dict[str, torch.Tensor], times: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Pooled interests ``(B, K, E, d)``: the S*M specific experts (level-major, modality order
        of ``self.modalities``), then the common expert when present.

        ``idx`` ``(B, S, K)``: per level, the last position strictly before each target. In eval the
        Transformers' last blocks run at those positions only (``rows``: the same values, less work
        when K << L; training keeps the full pass, so its dropout draws are unchanged).
        """
        B, S, L1, d = h["id"].shape
        K = idx.shape[-1]
        M = len(self.modalities)
        pos = self.pos(position_ids(times))  # (B, S, L1, d): counted back from each stream's newest event
        x = {m: h[m] + pos.to(h[m].dtype) for m in self.modalities}
        causal = window_mask(L1, self.window, times.device)
        out = []
        # specific experts: h^m_b = Transformer_m(h^m_b), causal, read at the level's history index
        if self.cfg.shared_specific:
            pooled = {}
            rows = None if self.training else idx.reshape(B * S, K)
            for m in self.modalities:
                y = self.specific[m](x[m].reshape(B * S, L1, d), causal, rows)
                if rows is None:
                    y = y.view(B, S, L1, d).gather(2, idx[..., None].expand(-1, -1, -1, d))
                pooled[m] = y.view(B, S, K, d)
            out = [pooled[m][:, s] for s in range(S) for m in self.modalities]
        else:
            for s in range(S):
                for m in self.modalities:
                    y = self.specific[f"{s}/{m}"](x[m][:, s], causal, None if self.training else idx[:, s])
                    out.append(y.gather(1, idx[:, s, :, None].expand(-1, -1, d)) if self.training else y)
        # common expert: h^share = CrossAttention([h_cl], [h_fa]); h_common = Transformer(h^share)
        if self.common is not None:
            q = torch.cat([x[m][:, 0] + self.type_emb[i].to(x[m].dtype) for i, m in enumerate(self.modalities)], 1)
            k = torch.cat([x[m][:, -1] + self.type_emb[i].to(x[m].dtype) for i, m in enumerate(self.modalities)], 1)
            mask = before_mask(times[:, 0].repeat(1, M), times[:, -1].repeat(1, M), self.window, L1)
            share = q + self.drop(self.common_cross(self.ln_cl(q), self.ln_fa(k), mask))
            tokens = causal.repeat(M, M)  # token (m, i) sees (m', j) for the j that position i sees
            rows = idx[:, 0][:, None, :] + L1 * torch.arange(M, device=times.device)[None, :, None]  # tokens (m, idx)
            if self.training:
                y = self.common(share, tokens)
                y = y.gather(1, rows.reshape(B, M * K, 1).expand(-1, -1, d))
            else:
                y = self.common(share, tokens, rows.reshape(B, M * K))
            out.append(y.view(B, M, K, d).mean(1))
        return torch.stack(out, 2)

    def route(self, z: torch.Tensor) -> torch.Tensor:
        """Experts ``(B, K, E, d)`` -> user vectors ``(B, K, d)``.

        gate: ``g = sigmoid(W_g [h_common; h_spec] + b_g)``, ``y = g * h_common + (1 - g) * W_s [h_spec]``
        (without a common expert: ``y = W_s [h_spec]``); softmax: ``y = sum_e softmax(W_r [h_1..h_E])_e h_e``;
        mean: ``y = mean_e h_e``.
        """
        flat = z.flatten(-2)
        if self.cfg.router == "gate":
            n_spec = self.n_experts - (self.common is not None)
            spec = self.spec_proj(z[..., :n_spec, :].flatten(-2))
            if self.gate is None:
                return spec
            g = torch.sigmoid(self.gate(flat))
            return g * z[..., -1, :] + (1 - g) * spec
        if self.cfg.router == "softmax":
            w = self.router(flat).softmax(-1)
            return (w[..., None] * z).sum(-2)
        return z.mean(-2)

    # -----------------------------------------------------------------------------------------
    # The forward pass
    # -----------------------------------------------------------------------------------------

    def forward_all(self, batch: dict[str, torch.Tensor], rec: dict | None = None):
        """-> (y ``(B, K, d)``, aux losses, experts ``(B, K, E, d)``). ``rec``: filled with intermediates."""
        items, times = batch["items"], batch["times"]
        valid = items > 0  # real events (not BOS, not padding): the positions the diffusion losses average
        aux: dict[str, torch.Tensor] = {}
        h = self.embed(items)
        if rec is not None:
            rec["input"] = {m: v.detach() for m, v in h.items()}
        if self.cdmd is not None:
            loss = self.modality_denoising(h, valid, rec)
            if self.training:
                aux["modality"] = loss
        if rec is not None:
            rec["cdmd"] = {m: v.detach() for m, v in h.items()}
        if self.cdbd is not None:
            loss = self.behaviour_denoising(h, times, valid, rec)
            if self.training:
                aux["behaviour"] = loss
        if rec is not None:
            rec["cdbd"] = {m: v.detach() for m, v in h.items()}
        idx = history_index(times, batch["target_times"])  # (B, S, K)
        z = self.experts(h, times, idx)
        if self.training and self.cfg.contrastive:
            has = (batch["targets"] > 0).float()
            if self.cfg.contrastive_variant == "apart":
                per = contrastive_apart(z, self.cfg.tau)
            else:  # a second dropout view of the experts on the same denoised streams
                per = contrastive_push(z, self.experts(h, times, idx), self.cfg.tau)
            aux["contrast"] = (per * has).sum() / has.sum().clamp(min=1)
        return self.route(z), aux, z

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (y ``(B, K, d)``, {"modality": L_m, "behaviour": L_b, "contrast": L_c}); aux is empty in eval."""
        y, aux, _ = self.forward_all(batch)
        return y, aux

    @torch.no_grad()
    def denoise_outputs(self, batch: dict[str, torch.Tensor]) -> dict:
        """Intermediate representations for the notebooks (t-SNE, attention maps), in the current mode.

        Returns {"input" | "cdmd" | "cdbd": {modality: ``(B, S, L+1, d)``} (the streams before
        CDMD, after CDMD, after CDBD), "chains": {"cdmd/<m>" | "cdbd/<m>/<levels>": {"levels",
        "states": [h_0 .. h_n] ``(B, S', L+1, d)``, "weights": per step
        ``(B, S', heads, L+1, Lc)``}} (S' = the chain's "levels"), "experts": ``(B, K, E, d)``, "y": ``(B, K, d)``, "valid": ``(B, S, L+1)``
        bool (real events), "levels": level names, "modalities"}.
        """
        rec: dict = {"chains": {}}
        y, _, z = self.forward_all(batch, rec)
        rec.update(experts=z, y=y, valid=batch["items"] > 0, levels=list(self.info.levels),
                   modalities=list(self.modalities))
        return rec

    def item_scores(self, y: torch.Tensor) -> torch.Tensor:
        if not self.cfg.tie_weights:
            return super().item_scores(y)
        return F.linear(y, self.item.weight.to(y.dtype), self.out_bias.to(y.dtype))

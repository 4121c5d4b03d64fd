"""M3BSR and its diffusion module: shapes, time causality, gradients, determinism, switches."""
from __future__ import annotations

import math

import pytest
import torch

from m3bsr.config import ModelConfig
from m3bsr.data.sequences import TIME_BOS, TIME_PAD, history_index, position_ids
from m3bsr.models.base import DataInfo
from m3bsr.models.diffusion import (ConditionalChain, NoisePredictor, Schedule, cosine_schedule, linear_schedule,
                                    p_step, q_step)
from m3bsr.models.layers import before_mask, sinusoidal
from m3bsr.models import m3bsr as m3bsr_module
from m3bsr.models.m3bsr import M3BSR, contrastive_apart, contrastive_push
from m3bsr.models.registry import build_model

N_ITEMS, L, D = 30, 6, 16

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model="m3bsr", d=D, layers=1, heads=2, dropout=0.1, T=3)
    return ModelConfig(**{**base, **kw})


def tiny_info(S: int = 2, features: tuple[str, ...] = ("image", "text"), seed: int = 0) -> DataInfo:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(N_ITEMS + 1, dim, generator=g) for m, dim in (("image", 12), ("text", 8)) if m in features}
    masks = {}
    for m in feats:
        mask = torch.ones(N_ITEMS + 1, dtype=torch.bool)
        mask[[0, 3]] = False  # padding row, and one item lacking the modality (trains the 'missing' vector)
        masks[m] = mask
    return DataInfo(n_items=N_ITEMS, levels=["click", "cart", "favor"][-S:] if S <= 3 else [str(i) for i in range(S)],
                    features=feats, feature_mask=masks)


def tiny_batch(B: int = 3, S: int = 2, seed: int = 0, eval_rows: bool = False) -> dict[str, torch.Tensor]:
    """A hand-built batch in the sequences format: BOS at 0, sorted times (with ties across
    levels), padding at the end; training rows have every deep event as a target (K = L)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (B, S, L + 1), generator=g)
    times = torch.randint(0, 12, (B, S, L + 1), generator=g).sort(-1).values
    lengths = torch.randint(3, L + 1, (B, S), generator=g)
    lengths[0] = L  # one full row
    pad = torch.arange(L + 1) > lengths[..., None]
    items[pad], times[pad] = 0, TIME_PAD
    items[:, :, 0], times[:, :, 0] = 0, TIME_BOS
    items[0, :, 1] = 3  # the item lacking features (see tiny_info) is in every batch
    if eval_rows:  # one target after everything
        targets = torch.randint(1, N_ITEMS + 1, (B, 1), generator=g)
        target_times = torch.full((B, 1), 100)
    else:
        targets, target_times = items[:, -1, 1:].clone(), times[:, -1, 1:].clone()
        targets[target_times <= times[:, :, 1].min(1).values[:, None]] = 0  # a target needs some history
    return dict(items=items, times=times, targets=targets, target_times=target_times, users=torch.arange(B))


def make(seed: int = 0, S: int = 2, features=("image", "text"), **kw) -> M3BSR:
    torch.manual_seed(seed)
    return M3BSR(tiny_cfg(**kw), tiny_info(S, features))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# diffusion.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [cosine_schedule, linear_schedule])
def test_schedules_decrease_in_unit_interval(fn):
    abar = fn(15)
    assert abar.dtype == torch.float64 and abar[0] == 1
    assert (abar[1:] < abar[:-1]).all() and (abar > 0).all() and (abar <= 1).all()
    s = Schedule(15, "cosine" if fn is cosine_schedule else "linear")
    assert s.alphas.dtype == torch.float32 and s.alphas.shape == (15,)
    assert ((s.alphas > 0) & (s.alphas <= 1)).all()
    assert torch.allclose(s.alphas.double().cumprod(0), s.alphas_cumprod.double(), rtol=1e-5)
    assert torch.allclose(s.alphas_cumprod, abar[1:].float())  # the buffers are the named schedule's


def test_cosine_schedule_matches_formula():
    T = 15
    assert cosine_schedule(T)[T].item() == pytest.approx(math.cos(0.9 * math.pi / 2) ** 2)


def test_strided_steps_compose_to_the_same_abar():
    s = Schedule(15)
    full, strided = s.steps(), s.steps(4)
    assert [t for t, _, _ in full] == list(range(1, 16))
    assert [t for t, _, _ in strided][-1] == 15 and len(strided) == 4
    assert math.prod(a for _, a, _ in strided) == pytest.approx(strided[-1][2])
    assert math.prod(a for _, a, _ in full) == pytest.approx(full[-1][2])
    with pytest.raises(ValueError):
        s.grid(16)


def test_reverse_step_inverts_forward_step_with_the_true_noise():
    s = Schedule(5)
    _, a1, abar1 = s.steps()[0]  # at t = 1, abar_1 = a_1
    h, eps = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    assert torch.allclose(p_step(q_step(h, a1, eps), eps, a1, abar1), h, atol=1e-5)
    assert torch.allclose(q_step(h, a1, None), h * math.sqrt(a1))


def test_noise_predictor_respects_its_mask():
    torch.manual_seed(0)
    p = NoisePredictor(D, 2)
    x, c = torch.randn(2, 5, D), torch.randn(2, 7, D)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[:, :, :3] = True
    kv = p.condition(c)
    y, w = p(x, kv, mask, return_weights=True)
    assert w.shape == (2, 2, 5, 7) and (w[..., 3:] == 0).all()
    assert torch.allclose(y, p(x, kv, mask), atol=1e-5)  # explicit path == SDPA path
    c2 = c.clone()
    c2[:, 3:] += 1.0  # masked keys do not matter
    assert torch.allclose(p(x, p.condition(c2), mask), p(x, kv, mask), atol=1e-6)
    yc, wc = p(x[:, :5], p.condition(c[:, :5]), causal=True, return_weights=True)
    assert (wc.triu(1) == 0).all()
    assert torch.allclose(yc, p(x[:, :5], p.condition(c[:, :5]), causal=True), atol=1e-5)


def test_chain_modes_and_states():
    torch.manual_seed(0)
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    chain = ConditionalChain(tiny_cfg(T=4), D)
    r = chain(x, c, causal=True, return_states=True)
    assert r.out.shape == x.shape and r.loss.ndim == 0 and r.loss > 0
    assert len(r.states) == 5 and len(r.weights) == 4
    chain.eval()
    a, b = chain(x, c, causal=True), chain(x, c, causal=True)
    assert a.loss is None and torch.equal(a.out, b.out)
    for mode in ("stochastic", "skip"):
        ch = ConditionalChain(tiny_cfg(T=4, eval_mode=mode), D).eval()
        ch.load_state_dict(chain.state_dict())
        o1, o2 = ch(x, c, causal=True).out, ch(x, c, causal=True).out
        assert torch.equal(o1, o2)
        assert torch.equal(o1, x) == (mode == "skip")
    eps_chain = ConditionalChain(tiny_cfg(T=4, diffusion_loss="eps"), D)
    assert eps_chain(x, c, causal=True).loss > 0


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def test_before_mask_is_strictly_before_plus_bos():
    qt = torch.tensor([[TIME_BOS, 5, 7, TIME_PAD]])
    kt = torch.tensor([[TIME_BOS, 3, 5, 9, TIME_PAD]])
    m = before_mask(qt, kt)[0]
    assert m[1].tolist() == [True, True, False, False, False]  # time 5 sees BOS and 3, not 5
    assert m[2].tolist() == [True, True, True, False, False]
    assert not m[:, 4].any()  # padding keys are never visible
    assert not m[:3, 3].any()  # time 9 is after every real query
    assert m[0].tolist() == [True, False, False, False, False]  # a BOS query sees the BOS key only
    assert m[3].tolist() == [True, True, True, True, False]  # a padding query sees every real key (unused)


# --------------------------------------------------------------------------------------------
# M3BSR
# --------------------------------------------------------------------------------------------


def test_id_stream_tells_items_apart_at_initialisation():
    """h^id = LN(MLP(e_i)) must differ between items from the first step. With PyTorch's default
    MLP biases and a std-0.02 table, every item's ID input was 99.8 % cosine-identical to every other
    item's, and M3BSR learned little more than popularity; now they are close to orthogonal."""
    model = M3BSR(ModelConfig(d=64, layers=1, heads=2), DataInfo(n_items=200, levels=["click", "favor"]))
    h = torch.nn.functional.normalize(model.emb_ln["id"](model.id_embedding(torch.arange(1, 201))), dim=-1)
    cos = h @ h.T
    off_diagonal = cos[~torch.eye(200, dtype=torch.bool)]
    assert off_diagonal.abs().mean() < 0.3, off_diagonal.mean()


def test_registry_builds_m3bsr_and_shapes():
    model = build_model(tiny_cfg(), tiny_info())
    assert isinstance(model, M3BSR)
    batch = tiny_batch()
    y, aux = model.user_vectors(batch)
    assert y.shape == (3, L, D) and set(aux) == {"modality", "behaviour", "contrast"}
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "modality", "behaviour", "contrast"}
    assert all(torch.isfinite(v) for v in out.values())
    model.eval()
    y, aux = model.user_vectors(tiny_batch(eval_rows=True))
    assert y.shape == (3, 1, D) and aux == {}
    s = model.score(tiny_batch(eval_rows=True))
    assert s.shape == (3, N_ITEMS + 1) and (s[:, 0] == float("-inf")).all()


def _leak_check(model: M3BSR, batch: dict[str, torch.Tensor], train: bool) -> None:
    """Change each real event's item in turn: targets at or before its time keep their user vector,
    later targets of the same row change, other rows do not change."""
    model.train(train)

    def run(b):
        torch.manual_seed(123)  # same noise and dropout masks in training mode
        with torch.no_grad():
            return model.user_vectors(b)[0]

    y0 = run(batch)
    B, S, L1 = batch["items"].shape
    for b in range(B):
        for s in range(S):
            for p in range(1, L1):
                if batch["items"][b, s, p] == 0:
                    continue
                pert = {k: v.clone() for k, v in batch.items()}
                pert["items"][b, s, p] = pert["items"][b, s, p] % N_ITEMS + 1
                y1 = run(pert)
                tau = batch["times"][b, s, p]
                real = batch["targets"][b] > 0
                before = real & (batch["target_times"][b] <= tau)
                after = real & (batch["target_times"][b] > tau)
                where = f"row {b} level {s} position {p} (time {int(tau)})"
                assert torch.allclose(y1[b, before], y0[b, before], atol=1e-6, rtol=0), "leak: " + where
                diff = (y1[b, after] - y0[b, after]).abs().amax(-1)
                assert (diff > 1e-6).all(), "an earlier event was ignored: " + where
                others = torch.arange(B) != b
                assert torch.allclose(y1[others], y0[others], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(S=3, cdbd_condition="concat", cdbd_deeper="all", router="softmax", shared_specific=False),
    dict(S=3, eval_mode="stochastic", router="mean", contrastive_variant="push", tie_weights=True),
])
def test_no_future_leakage(kw):
    kw = dict(kw)
    S = kw.pop("S", 2)
    model = make(S=S, **kw)
    batch = tiny_batch(S=S)
    _leak_check(model, batch, train=False)
    _leak_check(model, batch, train=True)


def no_grad_ok(name: str) -> bool:
    """Parameters that legitimately get no gradient: Transformer blocks build a LayerNorm for a
    cross-attention condition (layers.Block.ln_c) that self-attention never uses."""
    return ".blocks." in name and ".ln_c." in name


@pytest.mark.parametrize("kw", [dict(), dict(S=3, cdbd_condition="concat", shared_specific=False, tie_weights=True,
                                              router="softmax", time_embedding=True, diffusion_loss="eps")])
def test_gradients_reach_every_parameter(kw):
    kw = dict(kw)
    S = kw.pop("S", 2)
    model = make(S=S, **kw)
    model.loss(tiny_batch(S=S))["loss"].backward()
    for name, p in model.named_parameters():
        if no_grad_ok(name):
            continue
        assert p.grad is not None, f"{name} gets no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_eval_is_deterministic():
    for mode in ("deterministic", "stochastic"):
        model = make(eval_mode=mode).eval()
        batch = tiny_batch(eval_rows=True)
        assert torch.equal(model.score(batch), model.score(batch))
    det, sto = make().eval(), make(eval_mode="stochastic").eval()
    assert not torch.equal(det.score(batch), sto.score(batch))


def test_each_switch_removes_its_component():
    batch = tiny_batch()
    full = make()
    base = n_params(full)
    aux = set(full.user_vectors(batch)[1])
    for kw, gone in ((dict(cdmd=False), "modality"), (dict(cdbd=False), "behaviour"),
                     (dict(contrastive=False), "contrast")):
        m = make(**kw)
        assert set(m.user_vectors(batch)[1]) == aux - {gone}
        if gone != "contrast":
            assert n_params(m) < base
            assert m.skipped
    assert n_params(make(common_expert=False)) < base
    for router in ("mean", "softmax"):
        m = make(router=router)
        assert m.gate is None and m.spec_proj is None
        assert (m.router is None) == (router == "mean")
    m = make(modalities="id")
    assert len(m.proj) == 0 and m.cdmd is None and m.modalities == ["id"]
    assert any("CDMD" in note for note in m.skipped)
    assert n_params(make(modalities="id,text")) < base
    assert n_params(make(shared_specific=False)) > base


def test_dataset_without_features_trains():
    model = make(features=())
    assert model.modalities == ["id"] and model.cdmd is None
    assert any("image" in n for n in model.skipped) and any("text" in n for n in model.skipped)
    out = model.loss(tiny_batch())
    assert "modality" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_three_levels_and_deeper_options():
    for deeper in ("next", "all"):
        model = make(S=3, cdbd_deeper=deeper)
        out = model.loss(tiny_batch(S=3))
        assert torch.isfinite(out["loss"]) and "behaviour" in out
        assert model.n_experts == 3 * 3 + 1
    batch = tiny_batch(S=3)
    nxt, every = make(S=3, cdbd_deeper="next").eval(), make(S=3, cdbd_deeper="all").eval()
    assert not torch.allclose(nxt.user_vectors(batch)[0], every.user_vectors(batch)[0])
    # with two levels the option makes no difference
    batch = tiny_batch()
    a, b = make(cdbd_deeper="next").eval(), make(cdbd_deeper="all").eval()
    assert torch.equal(a.user_vectors(batch)[0], b.user_vectors(batch)[0])


def test_single_level_dataset_trains():
    model = make(S=1)
    assert model.cdbd is None and model.common is None and model.n_experts == 3
    out = model.loss(tiny_batch(S=1))
    assert "behaviour" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_step_counts():
    batch = tiny_batch(eval_rows=True)
    m1 = make(T=1)
    assert torch.isfinite(m1.loss(tiny_batch())["loss"])
    full, fewer, same = make(T=6).eval(), make(T=6, inference_steps=2).eval(), make(T=6, inference_steps=6).eval()
    assert torch.equal(full.score(batch), same.score(batch))
    assert not torch.equal(full.score(batch), fewer.score(batch))
    with pytest.raises(ValueError):
        make(T=3, inference_steps=4)


def test_contrastive_apart_formula():
    z = torch.randn(2, 5, 7, D)
    got = contrastive_apart(z, 0.1)
    zn = torch.nn.functional.normalize(z, dim=-1)
    sim = zn @ zn.transpose(-1, -2) / 0.1
    ref = torch.zeros(2, 5)
    for i in range(7):
        others = [k for k in range(7) if k != i]
        lse = sim[..., i, others].logsumexp(-1)
        for j in others:
            ref -= sim[..., i, j] - lse
    assert torch.allclose(got, ref, atol=1e-3)


def test_contrastive_apart_is_smallest_for_collapsed_experts():
    """Its minimum E (E - 1) ln(E - 1) needs only equal pairwise similarities: seven copies of one
    vector, the same for every user, reach it; random (user-dependent) experts score higher."""
    E = 7
    floor = E * (E - 1) * math.log(E - 1)
    collapsed = torch.randn(D).expand(4, E, D)
    assert torch.allclose(contrastive_apart(collapsed, 0.1), torch.full((4,), floor), atol=1e-3)
    assert (contrastive_apart(torch.randn(4, E, D), 0.1) > floor + 1).all()


def test_contrastive_push_formula():
    """Catches unnormalised similarities, tau multiplying, and a mean over anchors instead of the sum."""
    z1, z2 = torch.randn(2, 5, 7, D), torch.randn(2, 5, 7, D)
    z1n, z2n = torch.nn.functional.normalize(z1, dim=-1), torch.nn.functional.normalize(z2, dim=-1)
    sim = z1n @ z2n.transpose(-1, -2) / 0.1
    ref = -sum(sim[..., i, i] - sim[..., i, :].logsumexp(-1) for i in range(7))
    assert torch.allclose(contrastive_push(z1, z2, 0.1), ref, atol=1e-3)


def test_push_contrasts_two_dropout_views_of_the_experts(monkeypatch):
    """Catches the push variant comparing the experts with themselves (one view): its positives would be
    identical and its loss a function of the first view alone."""
    views = []
    monkeypatch.setattr(m3bsr_module, "contrastive_push", lambda a, b, tau: views.append((a, b)) or a.sum((-1, -2)))
    make(contrastive_variant="push", dropout=0.3).loss(tiny_batch())
    (a, b), = views
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_denoise_outputs_and_history_pooling():
    model = make().eval()
    batch = tiny_batch()
    rec = model.denoise_outputs(batch)
    for stage in ("input", "cdmd", "cdbd"):
        assert set(rec[stage]) == {"id", "image", "text"}
        assert rec[stage]["image"].shape == (3, 2, L + 1, D)
    assert torch.equal(rec["input"]["id"], rec["cdmd"]["id"])  # CDMD leaves the ID stream alone
    assert not torch.equal(rec["input"]["image"], rec["cdmd"]["image"])
    assert torch.equal(rec["cdmd"]["text"][:, -1], rec["cdbd"]["text"][:, -1])  # the deep level passes CDBD unchanged
    assert not torch.equal(rec["cdmd"]["text"][:, 0], rec["cdbd"]["text"][:, 0])
    ch = rec["chains"]["cdmd/image"]
    assert len(ch["states"]) == model.cfg.T + 1 and ch["weights"][0].shape == (3, 2, 2, L + 1, L + 1)
    assert torch.equal(ch["states"][0], rec["input"]["image"])  # recorded as (B, S', L+1, d)
    assert torch.equal(rec["chains"]["cdbd/id/0"]["states"][0], rec["cdmd"]["id"][:, [0]])
    assert rec["experts"].shape == (3, L, model.n_experts, D)
    assert torch.allclose(rec["y"], model.user_vectors(batch)[0], atol=1e-6)
    assert history_index(batch["times"], batch["target_times"]).shape == (3, 2, L)


def test_bf16_autocast_keeps_losses_float32():
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(tiny_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_embed_gives_each_stream_its_own_bos_and_layernorm_and_h_id_is_mlp_of_sqrt_d_e():
    """embed = LN_m([BOS_{s,m}; h^m]) with h^id = MLP(sqrt(d) e_i). Catches a BOS shared by the levels or
    by the modalities, one LayerNorm for every modality, and the sqrt(d) scale left out."""
    model = make().eval()
    batch = tiny_batch()
    with torch.no_grad():
        torch.nn.init.normal_(model.bos)
        for ln in model.emb_ln.values():
            torch.nn.init.normal_(ln.weight)
        h = model.embed(batch["items"])
        for i, m in enumerate(model.modalities):
            for s in range(2):
                assert torch.allclose(h[m][:, s, 0], model.emb_ln[m](model.bos[s, i]).expand(3, D), atol=1e-6)
        e = model.item(batch["items"][:, :, 1:])
        assert torch.allclose(h["id"][:, :, 1:], model.emb_ln["id"](model.id_mlp(e * math.sqrt(D))), atol=1e-5)


def test_cdmd_conditions_image_and_text_on_the_id_stream():
    """Catches a CDMD chain conditioned on its own stream: changing only the ID stream must change the
    denoised image and text streams."""
    model = make().eval()
    batch = tiny_batch()
    with torch.no_grad():
        h = model.embed(batch["items"])
        h2 = {m: v.clone() for m, v in h.items()}
        h2["id"] += torch.randn_like(h2["id"])
        model.modality_denoising(h, batch["items"] > 0)
        model.modality_denoising(h2, batch["items"] > 0)
    for m in ("image", "text"):
        assert not torch.allclose(h[m], h2[m]), m


def _cdbd_changes_level0(model: M3BSR, S: int, changed: dict[str, int]) -> bool:
    """Whether CDBD's denoised level-0 ID stream changes when the streams ``changed`` ({modality: level})
    change (every position, BOS included, which every query sees)."""
    batch = tiny_batch(S=S)
    with torch.no_grad():
        base = model.embed(batch["items"])
        outs = []
        for change in ({}, changed):
            h = {m: v.clone() for m, v in base.items()}
            for m, level in change.items():
                h[m][:, level] += torch.randn_like(h[m][:, level])
            model.behaviour_denoising(h, batch["times"], batch["items"] > 0)
            outs.append(h["id"][:, 0])
    return not torch.allclose(*outs)


@pytest.mark.parametrize("deeper, seen", [("next", {1}), ("all", {1, 2})])
def test_cdbd_conditions_each_level_on_the_deeper_levels_it_names(deeper, seen):
    """Three levels: cdbd_deeper='next' conditions level 0 on level 1 only, 'all' on levels 1 and 2.
    Catches the deepest level standing in for the next one, and 'all' leaving a deeper level out."""
    model = make(S=3, cdbd_deeper=deeper).eval()
    assert {lvl for lvl in (1, 2) if _cdbd_changes_level0(model, 3, {"id": lvl})} == seen


@pytest.mark.parametrize("condition", ["same", "concat"])
def test_cdbd_concat_conditions_on_every_modality_of_the_deeper_level(condition):
    """cdbd_condition='same': the ID stream is conditioned on the deeper ID stream only; 'concat': on
    every modality of the deeper level. Catches 'concat' repeating the stream's own modality."""
    model = make(cdbd_condition=condition).eval()
    assert _cdbd_changes_level0(model, 2, {"image": 1}) == (condition == "concat")
    assert _cdbd_changes_level0(model, 2, {"id": 1})


class _TaggedExpert(torch.nn.Module):
    """Stands in for an expert Transformer: every output row holds ``code + 10 * level``, where the
    level is fixed or (streams of all levels stacked user-major) the input row's index mod S."""

    def __init__(self, code: int, S: int, level: int | None = None):
        super().__init__()
        self.code, self.S, self.level = code, S, level

    def forward(self, x, mask, rows=None):
        n, L1, d = x.shape
        level = torch.arange(n) % self.S if self.level is None else torch.full((n,), self.level)
        return (self.code + 10 * level).float()[:, None, None].expand(n, L1 if rows is None else rows.shape[1], d)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_specific_experts_are_level_major(shared, train):
    """Expert s * M + i is modality i's Transformer on level s (the order the docstring, the router's
    W_s and the notebooks' expert labels use). Catches a modality-major order."""
    S = 3
    model = make(S=S, shared_specific=shared).train(train)
    M = len(model.modalities)
    model.specific = torch.nn.ModuleDict(
        {m: _TaggedExpert(i, S) for i, m in enumerate(model.modalities)} if shared else
        {f"{s}/{m}": _TaggedExpert(i, S, s) for s in range(S) for i, m in enumerate(model.modalities)})
    with torch.no_grad():
        z = model.forward_all(tiny_batch(S=S))[2]
    for s in range(S):
        for i in range(M):
            assert (z[..., s * M + i, :] == i + 10 * s).all(), (s, i)


def test_common_expert_inputs_and_pooling():
    """h^share = h_cl + CrossAttention(LN(h_cl), LN(h_fa)), tokens (modality, position) of the click and the
    favor level with position and modality-type embeddings; the expert is the mean over modalities of
    h_common = Transformer(h^share) at the history index. Catches the residual left out, the type
    embedding left off the favor tokens, and one modality's token standing in for the mean."""
    model = make().eval()
    batch = tiny_batch()
    seen = {}
    hook = lambda key: (lambda mod, args, out: seen.__setitem__(key, (args, out)))
    for key, mod in (("ln_cl", model.ln_cl), ("ln_fa", model.ln_fa), ("cross", model.common_cross),
                     ("common", model.common)):
        mod.register_forward_hook(hook(key))
    with torch.no_grad():
        rec = model.denoise_outputs(batch)
    pos = model.pos.table(position_ids(batch["times"]))  # counted back from each stream's newest event
    x = {m: rec["cdbd"][m] + pos for m in model.modalities}
    for key, level in (("ln_cl", 0), ("ln_fa", -1)):
        tokens = torch.cat([x[m][:, level] + model.type_emb[i] for i, m in enumerate(model.modalities)], 1)
        assert torch.allclose(seen[key][0][0], tokens, atol=1e-5), key
    share = seen["common"][0][0]
    assert torch.allclose(share, seen["ln_cl"][0][0] + seen["cross"][1], atol=1e-6)
    M, K = len(model.modalities), rec["experts"].shape[1]
    assert torch.allclose(rec["experts"][..., -1, :], seen["common"][1].view(3, M, K, D).mean(1), atol=1e-6)


@pytest.mark.parametrize("router", ["gate", "gate-no-common", "softmax", "mean"])
def test_router_mixes_the_experts_as_its_formula_says(router):
    """gate: y = g h_common + (1 - g) W_s [h_spec], g = sigmoid(W_g [all experts] + b_g) (no common
    expert: y = W_s [h_spec]); softmax: y = sum_e softmax_e(W_r [all]) h_e; mean: y = mean_e h_e.
    Catches the gate's weights swapped, W_s reading the common expert, and a sum for the mean."""
    model = make(router="gate", common_expert=False) if router == "gate-no-common" else make(router=router)
    E = model.n_experts
    z = torch.randn(3, 4, E, D)
    with torch.no_grad():
        if router == "gate":
            g = torch.sigmoid(model.gate(z.flatten(-2)))
            expected = g * z[..., -1, :] + (1 - g) * model.spec_proj(z[..., :-1, :].flatten(-2))
        elif router == "gate-no-common":
            expected = model.spec_proj(z.flatten(-2))
        elif router == "softmax":
            expected = torch.einsum("bke,bked->bkd", model.router(z.flatten(-2)).softmax(-1), z)
        else:
            expected = z.sum(-2) / E
        assert torch.allclose(model.route(z), expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# schedule values, step formulas, training noise and losses
# --------------------------------------------------------------------------------------------


def test_linear_schedule_is_the_product_of_one_minus_beta():
    """abar_t = prod_{s <= t} (1 - beta_s), beta linear from 1e-4 to 0.02 (DDPM)."""
    T = 10
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64).tolist()
    abar = linear_schedule(T)
    for t in range(1, T + 1):
        assert abar[t].item() == pytest.approx(math.prod(1 - b for b in betas[:t]), rel=1e-12)


def test_reverse_step_matches_its_formula_beyond_the_first_step():
    """p_step's noise coefficient uses abar_t: checked at t = 3 of 5, where a_t and abar_t differ
    (at t = 1 they are equal, so the inversion test above cannot tell them apart)."""
    _, a, abar = Schedule(5, "cosine").steps()[2]
    assert abs(a - abar) > 0.1
    h, e = torch.randn(4, 8), torch.randn(4, 8)
    expected = (h - (1 - a) / math.sqrt(1 - abar) * e) / math.sqrt(a)
    assert torch.allclose(p_step(h, e, a, abar), expected, atol=1e-5)


def test_strided_grid_is_round_i_T_over_n():
    """inference_steps = n visits t_i = round(i * T / n), i = 1..n (the documented grid)."""
    assert Schedule(15).grid(4) == [4, 8, 11, 15]
    assert Schedule(10).grid(3) == [3, 7, 10]


def test_forward_step_adds_sqrt_one_minus_a_t_eps_or_the_noise_drawn_already_scaled():
    """q_step: h~_t = sqrt(a_t) h + sqrt(1 - a_t) eps; with scaled=True the noise already holds
    sqrt(1 - a_t) eps (as the chain draws it) and is added as it is."""
    a = 0.7
    h, e = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(q_step(h, a, e), math.sqrt(a) * h + math.sqrt(1 - a) * e, atol=1e-6)
    assert torch.allclose(q_step(h, a, e, scaled=True), math.sqrt(a) * h + e, atol=1e-6)


def _spy_q_step(monkeypatch) -> list:
    """Record (a_t, scaled noise, h~_t) of every forward step a chain takes."""
    from m3bsr.models import diffusion
    got, real = [], diffusion.q_step

    def spy(h, a_t, eps, scaled=False):
        out = real(h, a_t, eps, scaled)
        got.append((a_t, eps, out))
        return out

    monkeypatch.setattr(diffusion, "q_step", spy)
    return got


def test_training_noise_of_step_t_has_std_sqrt_one_minus_a_t(monkeypatch):
    """The forward step adds sqrt(1 - a_t) eps (a_t, not abar_t: they differ from t = 2 on)."""
    got = _spy_q_step(monkeypatch)
    torch.manual_seed(0)
    chain = ConditionalChain(tiny_cfg(T=3, schedule="cosine"), D)
    chain(torch.randn(16, 64, D), torch.randn(16, 64, D), causal=True)
    assert len(got) == 3
    for a_t, noise, _ in got:
        assert noise.std().item() == pytest.approx(math.sqrt(1 - a_t), rel=0.03)


def test_eps_loss_is_zero_for_a_predictor_of_the_true_noise(monkeypatch):
    """diffusion_loss='eps' compares eps^_t with the unit-variance eps, not with the drawn sqrt(1 - a_t) eps."""
    got = _spy_q_step(monkeypatch)

    class Oracle(torch.nn.Module):
        def condition(self, c):
            return None

        def forward(self, x, kv, mask=None, causal=False, t=None, return_weights=False):
            a_t, noise, _ = got[-1]
            return noise / math.sqrt(1 - a_t)

    chain = ConditionalChain(tiny_cfg(T=3, diffusion_loss="eps"), D)
    chain.predictor = Oracle()
    assert chain(torch.randn(2, 5, D), torch.randn(2, 5, D)).loss.item() < 1e-10


def test_training_runs_all_T_steps_whatever_inference_steps():
    """inference_steps strides the evaluation chain only; training always takes the T steps."""
    chain = ConditionalChain(tiny_cfg(T=4, inference_steps=2), D)
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    assert len(chain(x, c, causal=True, return_states=True).states) == 5
    chain.eval()
    assert len(chain(x, c, causal=True, return_states=True).states) == 3


def test_chain_loss_sums_each_steps_weighted_mse_between_noisy_and_denoised(monkeypatch):
    """L = sum_t sum_l w_l mean_d (h~_t - h-_t)^2: every step counts, h-_t is the state the chain
    returns (and hands to the next step), and each position weighs its own w_l."""
    got = _spy_q_step(monkeypatch)
    torch.manual_seed(0)
    chain = ConditionalChain(tiny_cfg(T=3), D)
    x = torch.randn(2, 5, D)
    w = torch.rand(2, 5)
    w = w / w.sum()
    r = chain(x, torch.randn(2, 5, D), causal=True, weight=w, return_states=True)
    assert torch.equal(r.states[-1], r.out) and torch.equal(r.states[0], x)
    expected = sum((w * ((h_noisy - h_den) ** 2).mean(-1)).sum()
                   for (_, _, h_noisy), h_den in zip(got, r.states[1:]))
    assert r.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_noise_predictor_sees_the_step_it_denoises(monkeypatch):
    """time_embedding=True: the query is LN(h~_t) + W_t sinusoidal(t) with the t the chain visits
    (1..T in training, the strided grid in evaluation)."""
    from m3bsr.models import diffusion
    seen = []
    monkeypatch.setattr(diffusion, "sinusoidal", lambda t, d: seen.append(int(t)) or sinusoidal(t, d))
    torch.manual_seed(0)
    chain = ConditionalChain(tiny_cfg(T=4, inference_steps=2, time_embedding=True), D)
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    chain(x, c, causal=True)
    assert seen == [1, 2, 3, 4]
    chain.eval()
    seen.clear()
    chain(x, c, causal=True)
    assert seen == [2, 4]
    p, queries = chain.predictor, []
    p.q.register_forward_pre_hook(lambda mod, args: queries.append(args[0]))
    with torch.no_grad():
        p(x, p.condition(c), causal=True, t=3)
        expected = p.ln_q(x) + p.t_proj(sinusoidal(torch.tensor(3), D))
    assert torch.allclose(queries[0], expected, atol=1e-6)


def test_skip_mode_skips_the_chain_in_evaluation_only():
    """eval_mode='skip' still trains the chain (loss, denoised output); only evaluation returns the input."""
    torch.manual_seed(0)
    chain = ConditionalChain(tiny_cfg(T=3, eval_mode="skip"), D)
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    r = chain(x, c, causal=True)
    assert r.loss is not None and r.loss > 0 and not torch.allclose(r.out, x)
    assert torch.equal(chain.eval()(x, c, causal=True).out, x)


def test_stochastic_evaluation_draws_from_the_chains_own_seed():
    """eval_mode='stochastic' seeds the chain's generator with its own seed: the same seed gives the
    same output, another seed (another chain of the model) other noise."""
    torch.manual_seed(0)
    chains = [ConditionalChain(tiny_cfg(T=3, eval_mode="stochastic"), D, seed=s) for s in (1, 1, 2)]
    for ch in chains[1:]:
        ch.load_state_dict(chains[0].state_dict())
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    a, b, other = (ch.eval()(x, c, causal=True).out for ch in chains)
    assert torch.equal(a, b) and not torch.allclose(a, other)


def test_diffusion_losses_average_the_real_events_of_each_level():
    """CDMD and CDBD weight position l by 1 / (real events of its level in the batch): BOS and padding
    get 0, and each level's weights sum to 1 (a mean per level, whatever the batch size)."""
    model = make()
    batch = tiny_batch()
    weights = {}
    for name, chains in (("cdmd", model.cdmd), ("cdbd", model.cdbd)):
        for m, chain in chains.items():
            chain.register_forward_pre_hook(
                lambda mod, args, kw, key=f"{name}/{m}": weights.__setitem__(key, kw["weight"]), with_kwargs=True)
    model.loss(batch)
    valid = batch["items"] > 0
    B, S, L1 = valid.shape
    assert set(weights) == {"cdmd/image", "cdmd/text", "cdbd/id", "cdbd/image", "cdbd/text"}
    for key, w in weights.items():
        v = valid if key.startswith("cdmd") else valid[:, :1]  # CDBD: the click level
        w = w.view(B, -1, L1)  # CDMD rows are (user, level); CDBD's one level: users
        expected = v.float() / v.float().sum((0, 2), keepdim=True)
        assert torch.allclose(w, expected), key
    assert (valid[:, 0].sum(-1) != valid[:, 1].sum(-1)).any()  # the click level's own padding counts


def test_contrastive_loss_is_the_mean_over_real_targets():
    """L_contrast averages the per-target loss over real targets (target > 0), never over empty slots."""
    model = make()
    batch = tiny_batch()
    has = batch["targets"] > 0
    assert (~has).any()
    torch.manual_seed(0)
    _, aux, z = model.forward_all(batch)
    assert torch.allclose(aux["contrast"], contrastive_apart(z, model.cfg.tau)[has].mean(), atol=1e-5)


def test_total_loss_weights_each_auxiliary_term_by_its_own_lambda():
    """Catches an auxiliary term weighted by another term's lambda, or added unweighted."""
    model = make(lambda_c=0.3, lambda_m=0.5, lambda_b=0.7)
    out = model.loss(tiny_batch())
    assert {"contrast", "modality", "behaviour"} <= out.keys()
    expected = out["ce"] + 0.3 * out["contrast"] + 0.5 * out["modality"] + 0.7 * out["behaviour"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# layers.py
# --------------------------------------------------------------------------------------------

def _heads_by_hand(att, x, c, mask):
    """Multi-head attention written out: head i uses dims i*dh..(i+1)*dh of q, k, v; scores / sqrt(dh)."""
    d = x.shape[-1]
    dh = d // att.h
    q, (k, v) = att.q(x), att.kv(c).chunk(2, -1)
    ys, ws = [], []
    for i in range(att.h):
        s = slice(i * dh, (i + 1) * dh)
        w = (q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(dh)).masked_fill(~mask, float("-inf")).softmax(-1)
        ys.append(w @ v[..., s])
        ws.append(w)
    return att.proj(torch.cat(ys, -1)), torch.stack(ws, 1)


def test_attention_matches_multi_head_attention_written_out():
    """Catches the heads split across the wrong axis and the explicit (attention-map) path scaled by
    sqrt(d) instead of sqrt(d_head): both paths against the per-head formula, with a mask."""
    from m3bsr.models.layers import Attention
    torch.manual_seed(0)
    att = Attention(8, 2, 0.0).eval()
    x, c = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, False, True, False], [True, True, False, False], [True, True, True, True]]).expand(2, 3, 4)
    y_ref, w_ref = _heads_by_hand(att, x, c, mask)
    y_fused = att(x, c, mask)
    y, w = att(x, c, mask, return_weights=True)
    assert torch.allclose(y_fused, y_ref, atol=1e-5) and torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(w, w_ref, atol=1e-6)


def test_block_is_pre_ln_with_residuals_around_attention_and_feed_forward():
    """Catches the residual taken from the normalised input, the feed-forward net applied without its
    LayerNorm, self-attention keys read from the raw instead of the normalised input, and a
    cross-attention condition used without its own LayerNorm."""
    from m3bsr.models.layers import Block, causal_mask
    torch.manual_seed(0)
    blk = Block(8, 2, 0.0).eval()
    with torch.no_grad():  # LayerNorms that are not the identity, so that a missing one shows
        for ln in (blk.ln1, blk.ln2, blk.ln_c):
            ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    x = 3 * torch.randn(2, 5, 8) + 1
    mask = causal_mask(5)
    h = blk.ln1(x)
    y = x + blk.att(h, h, mask)
    assert torch.allclose(blk(x, mask), y + blk.ff(blk.ln2(y)), atol=1e-5)
    c = 3 * torch.randn(2, 7, 8) - 1
    y = x + blk.att(h, blk.ln_c(c), None)
    assert torch.allclose(blk(x, None, c), y + blk.ff(blk.ln2(y)), atol=1e-5)


def test_feature_projection_standardises_each_column_over_the_items_that_have_the_modality():
    """Frozen features enter as z-scores per column, mean and std over the items with the modality
    only; the others (and padding) hold zeros and get the learned 'missing' vector."""
    from m3bsr.models.layers import FeatureProjection
    feats = torch.randn(9, 4) * torch.tensor([1.0, 5.0, 0.1, 2.0]) + torch.tensor([0.0, 3.0, -1.0, 10.0])
    mask = torch.ones(9, dtype=torch.bool)
    mask[[0, 4]] = False
    feats[4] = 100.0  # a missing item's row must not move the statistics
    fp = FeatureProjection(feats, mask, 6)
    z = fp.features[mask]
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(4), atol=1e-4)
    assert (fp.features[~mask] == 0).all()
    assert torch.equal(fp(torch.tensor([4])), fp.missing[None])


def test_transformer_rows_equal_the_gathered_full_output():
    """Catches the query rows picked at the first of two blocks instead of the last."""
    from m3bsr.models.layers import Transformer, causal_mask, gather_positions
    torch.manual_seed(0)
    tf = Transformer(8, 2, 2, 0.0).eval()
    x, rows = torch.randn(2, 5, 8), torch.tensor([[4, 1], [2, 2]])
    full = tf(x, causal_mask(5))
    assert torch.allclose(tf(x, causal_mask(5), rows=rows), gather_positions(full, rows), atol=1e-5)


def test_sinusoidal_embedding_values():
    """Catches the frequencies spaced over d instead of d/2 and the cosine half replaced by sines."""
    e = sinusoidal(torch.tensor([0, 3]), 4)  # frequencies 10000^(-i/2), i = 0, 1: 1 and 0.01
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]])
    assert torch.allclose(e, expected, atol=1e-6)

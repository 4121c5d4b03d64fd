"""M3BSR and its diffusion module: shapes, time causality, gradients, determinism, switches."""
from __future__ import annotations

import math

import pytest
import torch

from m3bsr.config import ModelConfig
from m3bsr.data.sequences import TIME_BOS, TIME_PAD, history_index
from m3bsr.models.base import DataInfo
from m3bsr.models.diffusion import (ConditionalChain, NoisePredictor, Schedule, cosine_schedule, linear_schedule,
                                    p_step, q_step)
from m3bsr.models.layers import before_mask
from m3bsr.models.m3bsr import M3BSR, contrastive_apart
from m3bsr.models.registry import build_model

N_ITEMS, L, D = 30, 6, 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add synchronisation cost (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert y.shape == (3, L, D) and set(aux) == {"modality", "behavior", "contrast"}
    out = model.loss(batch)
    assert set(out) == {"loss", "ce", "modality", "behavior", "contrast"}
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
    for kw, gone in ((dict(cdmd=False), "modality"), (dict(cdbd=False), "behavior"),
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
        assert torch.isfinite(out["loss"]) and "behavior" in out
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
    assert "behavior" not in out and torch.isfinite(out["loss"])
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


def _spy_q_step(monkeypatch) -> list:
    """Record (a_t, scaled noise) of every forward step a chain takes."""
    from m3bsr.models import diffusion
    got, real = [], diffusion.q_step

    def spy(h, a_t, eps, scaled=False):
        got.append((a_t, eps))
        return real(h, a_t, eps, scaled)

    monkeypatch.setattr(diffusion, "q_step", spy)
    return got


def test_training_noise_of_step_t_has_std_sqrt_one_minus_a_t(monkeypatch):
    """The forward step adds sqrt(1 - a_t) eps (a_t, not abar_t: they differ from t = 2 on)."""
    got = _spy_q_step(monkeypatch)
    torch.manual_seed(0)
    chain = ConditionalChain(tiny_cfg(T=3, schedule="cosine"), D)
    chain(torch.randn(16, 64, D), torch.randn(16, 64, D), causal=True)
    assert len(got) == 3
    for a_t, noise in got:
        assert noise.std().item() == pytest.approx(math.sqrt(1 - a_t), rel=0.03)


def test_eps_loss_is_zero_for_a_predictor_of_the_true_noise(monkeypatch):
    """diffusion_loss='eps' compares eps^_t with the unit-variance eps, not with the drawn sqrt(1 - a_t) eps."""
    got = _spy_q_step(monkeypatch)

    class Oracle(torch.nn.Module):
        def condition(self, c):
            return None

        def forward(self, x, kv, mask=None, causal=False, t=None, return_weights=False):
            a_t, noise = got[-1]
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
        assert (w[~v] == 0).all(), key
        assert torch.allclose(w.sum((0, 2)), torch.ones(v.shape[1])), key


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
    assert {"contrast", "modality", "behavior"} <= out.keys()
    expected = out["ce"] + 0.3 * out["contrast"] + 0.5 * out["modality"] + 0.7 * out["behavior"]
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
    LayerNorm, and self-attention keys read from the raw instead of the normalised input."""
    from m3bsr.models.layers import Block, causal_mask
    torch.manual_seed(0)
    blk = Block(8, 2, 0.0).eval()
    with torch.no_grad():  # LayerNorms that are not the identity, so that a missing one shows
        for ln in (blk.ln1, blk.ln2):
            ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    x = 3 * torch.randn(2, 5, 8) + 1
    mask = causal_mask(5)
    h = blk.ln1(x)
    y = x + blk.att(h, h, mask)
    assert torch.allclose(blk(x, mask), y + blk.ff(blk.ln2(y)), atol=1e-5)


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
    from m3bsr.models.layers import sinusoidal
    e = sinusoidal(torch.tensor([0, 3]), 4)  # frequencies 10000^(-i/2), i = 0, 1: 1 and 0.01
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]])
    assert torch.allclose(e, expected, atol=1e-6)

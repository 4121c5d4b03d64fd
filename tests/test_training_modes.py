"""Training modes of the diffusion chains (``train_mode``: chain | strided | random_t) and the noise
predictor's residual flag: the closed forms, what each mode computes, and that each trains, is
deterministic under a seed and resumes like the default."""
from __future__ import annotations

import math

import pytest
import torch

from m3bsr.config import ConfigError, ModelConfig, make_config
from m3bsr.data.sequences import TIME_BOS
from m3bsr.models.base import DataInfo
from m3bsr.models.m3bsr import M3BSR
from m3bsr.models import diffusion
from m3bsr.models.diffusion import (ConditionalChain, NoisePredictor, Schedule, ddim_step, q_sample, q_step,
                                    x0_estimate)
from m3bsr.train import Trainer, evaluate_run, load_checkpoint

D = 16
MODES = ("strided", "random_t")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(model="m3bsr", d=D, layers=1, heads=2, dropout=0.1, T=3), **kw})


def ci_config(tmp_path, **over):
    return make_config("ci", {"dataset": "synthetic", "cache_dir": str(tmp_path / "cache"), "progress": False,
                              "model": "m3bsr", "max_steps": 9, "eval_steps": 3, **over})


def _spy_predictor(chain: ConditionalChain) -> list:
    """Record (input, t, output) of every noise-predictor call of ``chain``."""
    calls, real = [], chain.predictor.forward

    def spy(x, kv, mask=None, causal=False, t=None, return_weights=False):
        out = real(x, kv, mask, causal, t, return_weights)
        calls.append((x, t, out[0] if return_weights else out))
        return out

    chain.predictor.forward = spy
    return calls


# --------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 4, 10])
def test_closed_form_q_sample_matches_t_sequential_forward_steps(t):
    """q(h_t | h_0) in one draw, sqrt(abar_t) h_0 + sqrt(1 - abar_t) eps, has the mean and std of t
    forward steps q_step taken one after the other (cosine schedule: abar_10 = 0.024, far from 1)."""
    s = Schedule(10, "cosine")
    g = torch.Generator().manual_seed(0)
    h0 = torch.linspace(-2, 2, 8).expand(40000, 8)
    seq = h0
    for _, a, _ in s.steps()[:t]:
        seq = q_step(seq, a, torch.randn(h0.shape, generator=g))
    closed = q_sample(h0, s.abar[t], torch.randn(h0.shape, generator=g))
    mean, std = math.sqrt(s.abar[t]) * h0[0], math.sqrt(1 - s.abar[t])
    for h in (seq, closed):
        assert torch.allclose(h.mean(0), mean, atol=0.02)
        assert torch.allclose(h.std(0), torch.full((8,), std), rtol=0.03)
    assert torch.equal(q_sample(h0[:2], s.abar[t], None), math.sqrt(s.abar[t]) * h0[:2])


def test_x0_estimate_inverts_q_sample_and_ddim_ends_on_it():
    """h^_0 = (h_t - sqrt(1 - abar_t) eps^) / sqrt(abar_t) recovers h_0 from the true eps, per-position
    abar_t included; a DDIM step to s = 0 (abar_0 = 1) returns h^_0, to s > 0 it re-noises h^_0 with eps^."""
    h0, eps = torch.randn(3, 5, D), torch.randn(3, 5, D)
    abar = torch.rand(3, 5, 1) * 0.9 + 0.05
    assert torch.allclose(x0_estimate(q_sample(h0, abar, eps), eps, abar), h0, atol=1e-5)
    h_t = q_sample(h0, 0.6, eps)
    assert torch.allclose(ddim_step(h_t, eps, 0.6, 1.0), h0, atol=1e-5)
    assert torch.allclose(ddim_step(h_t, eps, 0.6, 0.8), q_sample(h0, 0.8, eps), atol=1e-5)


def test_predictor_residual_false_removes_the_residual():
    """eps^ = u + W_o MHA(...) with u = LN(h~) [+ W_t sin(t)]; predictor_residual=False leaves W_o MHA(...)
    alone (same weights: the two differ by exactly u), on the fused and on the explicit path."""
    torch.manual_seed(0)
    on, off = NoisePredictor(D, 2, time_embedding=True), NoisePredictor(D, 2, time_embedding=True, residual=False)
    off.load_state_dict(on.state_dict())
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    kv = on.condition(c)
    u = on.ln_q(x) + on.t_proj(diffusion.sinusoidal(torch.tensor(2), D))
    for weights in (False, True):
        a, b = on(x, kv, causal=True, t=2, return_weights=weights), off(x, kv, causal=True, t=2, return_weights=weights)
        a, b = (a[0], b[0]) if weights else (a, b)
        assert torch.allclose(a - b, u, atol=1e-5)
    chain = ConditionalChain(tiny_cfg(predictor_residual=False), D)
    assert chain.predictor.residual is False and ConditionalChain(tiny_cfg(), D).predictor.residual is True


def test_the_predictor_embeds_one_t_per_position():
    """t as an (N, Lq) tensor: position (n, l) gets W_t sinusoidal(t[n, l]), as if called with that int."""
    torch.manual_seed(0)
    p = NoisePredictor(D, 2, time_embedding=True)
    x, c = torch.randn(2, 4, D), torch.randn(2, 4, D)
    kv = p.condition(c)
    t = torch.tensor([[1, 2, 3, 1], [3, 3, 2, 1]])
    per = p(x, kv, causal=True, t=t)
    for v in (1, 2, 3):
        assert torch.allclose(per[t == v], p(x, kv, causal=True, t=v)[t == v], atol=1e-5)


# --------------------------------------------------------------------------------------------
# what each mode computes
# --------------------------------------------------------------------------------------------


def test_strided_mode_trains_and_evaluates_on_the_strided_grid(monkeypatch):
    """train_mode='strided': the training chain takes train_steps strided steps (None: round(T / 3)) with
    the composed a_eff of few-step inference; evaluation takes the same steps unless inference_steps says."""
    got, real = [], diffusion.q_step
    monkeypatch.setattr(diffusion, "q_step", lambda h, a, e, scaled=False: got.append(a) or real(h, a, e, scaled))
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    for n, T, grid in ((2, 6, [3, 6]), (None, 9, [3, 6, 9]), (None, 2, [2])):
        chain = ConditionalChain(tiny_cfg(T=T, train_mode="strided", train_steps=n), D)
        a_eff = [a for _, a, _ in chain.schedule.steps(len(grid))]
        assert chain.schedule.grid(len(grid)) == grid
        got.clear()
        r = chain(x, c, causal=True, return_states=True)
        assert got == a_eff and len(r.states) == len(grid) + 1 and r.loss > 0
        got.clear()
        chain.eval()(x, c, causal=True)
        assert got == a_eff
    got.clear()
    ConditionalChain(tiny_cfg(T=6, train_mode="strided", train_steps=2, inference_steps=6), D).eval()(x, c)
    assert len(got) == 6


def test_random_t_trains_one_call_at_a_random_t_per_position_and_outputs_the_x0_estimate():
    """random_t, training: each position draws t in 1..T; the predictor (time embedding forced on) sees
    h_t = sqrt(abar_t) h_0 + sqrt(1 - abar_t) eps once; with the true eps as prediction the loss
    ||eps - eps^||^2 is 0 and the x0 estimate the chain returns is h_0 itself."""
    torch.manual_seed(0)
    T = 5
    chain = ConditionalChain(tiny_cfg(T=T, train_mode="random_t", schedule="cosine"), D)
    assert chain.predictor.t_proj is not None  # time_embedding=False in the config
    x, c = torch.randn(4, 30, D), torch.randn(4, 30, D)
    calls = _spy_predictor(chain)
    r = chain(x, c, causal=True, return_states=True)
    (h_t, t, eps_hat), = calls
    assert t.shape == (4, 30) and set(t.unique().tolist()) == set(range(1, T + 1))
    assert (t != t[:, :1]).any(1).all()  # drawn per position, not per row
    abar = chain.schedule.alphas_cumprod[t - 1][..., None]
    eps = (h_t - abar.sqrt() * x) / (1 - abar).sqrt()
    assert eps.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.allclose(r.out, x0_estimate(h_t, eps_hat, abar), atol=1e-5)
    assert r.loss.item() == pytest.approx(((eps - eps_hat) ** 2).mean().item(), rel=1e-4)
    assert len(r.states) == 2 and torch.equal(r.states[-1], r.out) and len(r.weights) == 1

    class Oracle(torch.nn.Module):
        def condition(self, c):
            return None

        def forward(self, h, kv, mask=None, causal=False, t=None, return_weights=False):
            a = chain.schedule.alphas_cumprod[t - 1][..., None]
            return (h - a.sqrt() * x) / (1 - a).sqrt()

    chain.predictor = Oracle()
    r = chain(x, c)
    assert r.loss.item() < 1e-8 and torch.allclose(r.out, x, atol=1e-4)


def test_random_t_evaluates_by_ddim_from_random_t_eval_from():
    """random_t, evaluation: start at the mean sqrt(abar_t*) h_0 of q(h_t* | h_0), t* = random_t_eval_from
    (None: round(T / 3)), and take inference_steps DDIM steps on round(i t* / n) (None: one step, the x0
    estimate)."""
    torch.manual_seed(0)
    x, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    chain = ConditionalChain(tiny_cfg(T=6, train_mode="random_t"), D).eval()
    calls = _spy_predictor(chain)
    r = chain(x, c, causal=True, return_states=True)
    (h, t, eps_hat), = calls
    abar = chain.schedule.abar[2]
    assert t == 2 and torch.allclose(h, math.sqrt(abar) * x)
    assert torch.allclose(r.out, x - math.sqrt((1 - abar) / abar) * eps_hat, atol=1e-5)
    assert len(r.states) == 2 and torch.equal(r.states[-1], r.out) and r.loss is None
    once = chain(x, c, causal=True).out  # the fused attention path: the same up to rounding, and deterministic
    assert torch.allclose(once, r.out, atol=1e-5) and torch.equal(chain(x, c, causal=True).out, once)
    for over, ts in (({"random_t_eval_from": 4, "inference_steps": 2}, [4, 2]),
                     ({"random_t_eval_from": 3}, [3]), ({"random_t_eval_from": 6, "inference_steps": 3}, [6, 4, 2])):
        ch = ConditionalChain(tiny_cfg(T=6, train_mode="random_t", **over), D).eval()
        ch.load_state_dict(chain.state_dict())
        calls = _spy_predictor(ch)
        r = ch(x, c, causal=True, return_states=True)
        assert [t for _, t, _ in calls] == ts and len(r.states) == len(ts) + 1 and len(r.weights) == len(ts)
    stoch = [ConditionalChain(tiny_cfg(T=6, train_mode="random_t", eval_mode="stochastic"), D, seed=1).eval()
             for _ in range(2)]
    for ch in stoch:
        ch.load_state_dict(chain.state_dict())
    a, b = (ch(x, c, causal=True).out for ch in stoch)
    assert torch.equal(a, b) and not torch.allclose(a, once)


def test_mode_fields_are_checked_where_they_are_read():
    """train_steps belongs to strided, random_t_eval_from to random_t; steps beyond T (or t*) are refused
    when the model is built; unknown modes by Config.set; set away from their defaults they change the
    config hash (the default hash is pinned in tests/test_data.py)."""
    for kw, words in (({"train_steps": 2}, "train_mode='strided' only"),
                      ({"train_mode": "strided", "random_t_eval_from": 2}, "train_mode='random_t' only"),
                      ({"train_mode": "strided", "train_steps": 4}, "'train_steps' must be in 1..T=3"),
                      ({"train_mode": "random_t", "random_t_eval_from": 4}, "'random_t_eval_from' must be in 1..T=3"),
                      ({"train_mode": "random_t", "random_t_eval_from": 2, "inference_steps": 3},
                       "'inference_steps' must be in 1..random_t_eval_from=2"),
                      ({"train_mode": "walk"}, "must be one of")):
        with pytest.raises(ConfigError, match=words):
            ConditionalChain(tiny_cfg(**kw), D)
    with pytest.raises(ConfigError, match="must be one of"):
        make_config("ci", {"train_mode": "walk"})
    base = make_config("ci").hash()
    for k, v in (("train_mode", "random_t"), ("predictor_residual", False)):
        assert make_config("ci", {k: v}).hash() != base


# --------------------------------------------------------------------------------------------
# training end to end (ci profile, synthetic)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_its_predictors_deterministically_and_resumes_exactly(tmp_path, mode):
    """Each mode trains M3BSR on the ci profile: finite losses that fall, every noise predictor's weights
    moved; the same seed gives the same metrics; a run killed after its second validation and resumed ends with the
    uninterrupted run's metrics. random_t's evaluation start t* can be changed on a trained run."""
    first = Trainer(ci_config(tmp_path, train_mode=mode), tmp_path / "a")
    init = {k: v.clone() for k, v in first.model.state_dict().items()}
    res = first.fit()
    hist = first.history
    assert all(math.isfinite(h[k]) for h in hist for k in ("loss", "ce", "modality", "behaviour"))
    assert hist[-1]["loss"] < hist[0]["loss"]
    moved = {k.split(".predictor.")[0] for k, v in first.model.state_dict().items()
             if ".predictor." in k and not torch.equal(v, init[k])}
    assert moved == {f"cdmd.{m}" for m in ("image", "text")} | {f"cdbd.{m}" for m in ("id", "image", "text")}
    assert Trainer(ci_config(tmp_path, train_mode=mode), tmp_path / "b").fit() == res
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    if mode == "random_t":  # evaluate may move the start t* (ci: T = 5, t* = round(5 / 3) = 2)
        assert evaluate_run(tmp_path / "a", "cpu", {"random_t_eval_from": "2"})["test"] == res["test"]
        assert evaluate_run(tmp_path / "a", "cpu", {"random_t_eval_from": "5", "inference_steps": "5"})["test"] \
            != res["test"]

    cut = Trainer(ci_config(tmp_path, train_mode=mode), tmp_path / "cut")
    real_steps, calls = cut.train_steps, []

    def crash_in_third_stretch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-run; last.pt holds the second validation (step 6)
        return real_steps(*args, **kwargs)

    cut.train_steps = crash_in_third_stretch
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["steps"] == 6
    resumed = Trainer(ci_config(tmp_path, train_mode=mode), tmp_path / "cut").fit(resume=True)
    assert resumed == res
    assert (tmp_path / "cut" / "metrics.json").read_text() == (tmp_path / "a" / "metrics.json").read_text()


def test_random_t_chain_states_reach_the_notebooks():
    """denoise_outputs records each chain's states in random_t too: [h_0, h^_0] with one evaluation step."""
    torch.manual_seed(0)
    n = 20
    info = DataInfo(n_items=n, levels=["click", "favor"], features={"text": torch.randn(n + 1, 8)},
                    feature_mask={"text": torch.arange(n + 1) > 0})
    model = M3BSR(tiny_cfg(train_mode="random_t"), info).eval()
    items = torch.randint(1, n + 1, (2, 2, 6))
    items[:, :, 0] = 0
    times = torch.arange(6).expand(2, 2, 6).clone()
    times[:, :, 0] = TIME_BOS
    batch = dict(items=items, times=times, targets=torch.ones(2, 1, dtype=torch.long),
                 target_times=torch.full((2, 1), 100), users=torch.arange(2))
    rec = model.denoise_outputs(batch)
    ch = rec["chains"]["cdmd/text"]
    assert len(ch["states"]) == 2 and len(ch["weights"]) == 1
    assert torch.equal(ch["states"][-1], rec["cdmd"]["text"])

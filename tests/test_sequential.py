"""BERT4Rec, MBT and DiffuRec: shapes, no peeking at or after the target, seeded sampling, training."""
import math

import pytest
import torch

from m3bsr.config import ModelConfig
from m3bsr.data.sequences import TIME_BOS, TIME_PAD, history_index, position_ids
from m3bsr.models.base import DataInfo
from m3bsr.models import sequential
from m3bsr.models.baselines import Popularity
from m3bsr.models.sequential import BERT4Rec, DiffuRec, MBT, diffurec_betas

N, L, S = 30, 8, 2
FUTURE = range(N - 4, N + 1)  # ids used only to perturb events at or after a target

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_batch(B=6, S=S, L=L, seed=0, eval_rows=False):
    """Hand-made rows in the batch layout. Training: every deep event with an earlier event is a
    target (K = L). Eval (K = 1): the target time falls mid-row, so later events exist to be ignored."""
    g = torch.Generator().manual_seed(seed)
    items = torch.zeros(B, S, L + 1, dtype=torch.long)
    times = torch.full((B, S, L + 1), TIME_PAD)
    times[:, :, 0] = TIME_BOS
    K = 1 if eval_rows else L
    targets, target_times = torch.zeros(B, K, dtype=torch.long), torch.full((B, K), TIME_PAD)
    for b in range(B):
        for s in range(S):
            n = int(torch.randint(2, L + 1, (1,), generator=g))
            times[b, s, 1:n + 1] = torch.randperm(40, generator=g)[:n].sort().values  # ties across levels happen
            items[b, s, 1:n + 1] = torch.randint(1, N - 4, (n,), generator=g)
        deep = items[b, -1] > 0
        if eval_rows:
            targets[b, 0], target_times[b, 0] = int(torch.randint(1, N - 4, (1,), generator=g)), 20
        else:
            first = times[b, :, 1].min()
            keep = deep[1:] & (times[b, -1, 1:] > first)
            targets[b] = items[b, -1, 1:] * keep
            target_times[b] = torch.where(deep[1:], times[b, -1, 1:], TIME_PAD)
    return dict(items=items, times=times, targets=targets, target_times=target_times, users=torch.arange(B))


def perturb_from(batch, tau, seed=1):
    """A copy of ``batch`` whose events at or after time ``tau`` (B,) get other (FUTURE) items."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    hit = (out["times"] >= tau[:, None, None]) & (out["items"] > 0)
    out["items"][hit] = torch.randint(FUTURE.start, FUTURE.stop, (int(hit.sum()),), generator=g)
    return out


def build(cls, levels=S, **over):
    torch.manual_seed(0)
    cfg = ModelConfig(d=16, layers=2, heads=2, dropout=0.1, diffurec_T=8, **over)
    return cls(cfg, DataInfo(n_items=N, levels=[f"b{i}" for i in range(levels)]))


@pytest.mark.parametrize("cls", [BERT4Rec, MBT, DiffuRec])
def test_loss_and_score_shapes(cls):
    model = build(cls)
    out = model.loss(make_batch())
    assert {"loss", "ce"} <= set(out) and out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    model.eval()
    scores = model.score(make_batch(eval_rows=True))
    assert scores.shape == (6, N + 1)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_mbt_merge_sorts_by_time_then_level_with_bos_first_and_padding_last():
    batch = make_batch(S=3)
    it, tm, bh = MBT.merge(batch["items"], batch["times"])
    assert it.shape == (6, 1 + 3 * L)
    assert (it[:, 0] == 0).all() and (tm[:, 0] == TIME_BOS).all() and (bh[:, 0] == 3).all()
    real = it > 0
    assert (real[:, 1:].int().diff(dim=1) <= 0).all()  # padding only after the last event
    key = torch.where(real, tm * 3 + bh, TIME_PAD)[:, 1:]  # times < 40: the key is exact
    assert (key.diff(dim=1) >= 0).all()
    for b in range(6):
        assert sorted(it[b][real[b]].tolist()) == sorted(batch["items"][b][batch["items"][b] > 0].tolist())
    assert (bh[~real] == 3).all()


@pytest.mark.parametrize("cls", [MBT, DiffuRec])
def test_left_to_right_outputs_ignore_events_at_or_after_the_target(cls):
    model = build(cls).eval()
    batch = make_batch()
    x_t, t = torch.randn(6, L, 16), torch.randint(1, 9, (6, L))

    def outputs(b):
        if cls is MBT:
            return model.user_vectors(b)[0]
        return model.denoise(*model.encode(b), x_t, t)

    changed = False
    with torch.no_grad():
        y = outputs(batch)
        for k in range(L):
            y2 = outputs(perturb_from(batch, batch["target_times"][:, k]))
            valid = batch["targets"][:, k] > 0
            assert torch.allclose(y[valid, k], y2[valid, k], atol=1e-5)
            changed |= not torch.allclose(y, y2)
    assert changed  # the perturbations did reach later targets


@pytest.mark.parametrize("cls", [BERT4Rec, MBT, DiffuRec])
def test_scores_ignore_events_at_or_after_the_target(cls):
    model = build(cls).eval()
    batch = make_batch(eval_rows=True)
    with torch.no_grad():
        assert torch.equal(model.score(batch), model.score(perturb_from(batch, batch["target_times"][:, 0])))


def test_bert4rec_eval_input_is_the_history_before_the_target_then_mask():
    model = build(BERT4Rec)
    batch = perturb_from(make_batch(eval_rows=True), torch.full((6,), 20))  # every later event is a FUTURE item
    x, at = model.eval_input(batch)
    assert x.shape == (6, L)
    for b in range(6):
        deep, tm = batch["items"][b, -1, 1:], batch["times"][b, -1, 1:]
        before = deep[tm < 20].tolist()[-(L - 1):]
        assert x[b, :at[b]].tolist() == before
        assert x[b, at[b]] == model.mask_id and (x[b, at[b] + 1:] == 0).all()
    assert not any(i in FUTURE for i in x.flatten().tolist())
    full = make_batch(eval_rows=True)
    full["times"][:, -1, 1:] = torch.arange(L)  # L events before the target: the oldest one is dropped
    full["items"][:, -1, 1:] = torch.arange(1, L + 1)
    x, at = model.eval_input(full)
    assert (at == L - 1).all() and x[0].tolist() == list(range(2, L + 1)) + [model.mask_id]


def test_bert4rec_masks_about_mask_ratio_of_the_events_and_at_least_one():
    model = build(BERT4Rec, mask_ratio=0.2)
    model.mask_last_prob = 0.0
    items = torch.randint(1, N + 1, (2000, 20))
    items[:, 15:] = 0  # 15 events per row -> 3 masked
    items[:100, 1:] = 0  # a single event -> masked anyway
    torch.manual_seed(0)
    inputs, labels = model.mask_items(items)
    masked = labels > 0
    assert torch.equal(masked, inputs == model.mask_id)
    assert torch.equal(labels[masked], items[masked]) and torch.equal(inputs[~masked], items[~masked])
    assert (masked.sum(-1)[:100] == 1).all() and (masked.sum(-1)[100:] == 3).all()
    assert abs(masked[100:].float().mean() * 20 / 15 - 0.2) < 1e-6
    assert abs(masked[100:, 0].float().mean() - 0.2) < 0.03  # positions are chosen uniformly
    model.mask_last_prob = 1.0
    _, labels = model.mask_items(items)
    assert torch.equal(labels > 0, torch.arange(20) == (items > 0).sum(-1, keepdim=True) - 1)


def test_diffurec_sampling_is_seeded():
    batch = make_batch(eval_rows=True)
    for mode in ("deterministic", "stochastic"):
        model = build(DiffuRec, eval_mode=mode).eval()
        with torch.no_grad():
            a, b = model.score(batch), model.score(batch)
            model.sample_seed = 1
            c = model.score(batch)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_diffurec_schedules_and_strided_steps():
    for name in ("trunc_lin", "cosine"):
        for T in (1, 8, 32):
            betas = diffurec_betas(name, T)
            assert betas.shape == (T,) and (betas > 0).all() and (betas < 1).all()
    assert build(DiffuRec).steps == list(range(8, 0, -1))
    assert build(DiffuRec, inference_steps=3).steps == [8, 5, 1]
    assert build(DiffuRec, inference_steps=50).steps == list(range(8, 0, -1))


@pytest.mark.parametrize("cls", [BERT4Rec, MBT, DiffuRec])
def test_a_few_steps_of_training_reduce_the_loss_and_reach_every_parameter(cls):
    model = build(cls, levels=S)
    batch = make_batch(B=16, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        opt.zero_grad()
        loss = model.loss(batch)["loss"]
        loss.backward()
        if step == 0:
            silent = [n for n, p in model.named_parameters()
                      if (p.grad is None or not p.grad.any()) and ".ln_c." not in n]  # ln_c: cross-attention only
            assert not silent, silent
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("name", ["sasrec", "sasrec-mm", "bert4rec", "mbt", "diffurec"])
def test_embedding_tables_start_on_one_small_scale(name):
    """Item, position and behaviour tables all start at std 0.02: a table left at nn.Embedding's
    N(0, 1) (as SASRec's positions once were) drowns the items, and the model learns little more
    than popularity."""
    from m3bsr.models.registry import MODELS
    info = DataInfo(n_items=30, levels=["click", "favor"], features={"image": torch.randn(31, 8)},
                    feature_mask={"image": torch.ones(31, dtype=torch.bool)})
    model = MODELS[name](ModelConfig(model=name, d=16, layers=1, heads=2), info)
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables
    for t in tables:
        assert t.weight.std().item() < 0.05, (name, t)


def build_sasrec(name: str):
    """SASRec or SASRec+MM (with an image feature) in eval mode, on two levels."""
    from m3bsr.models.registry import MODELS
    torch.manual_seed(0)
    info = DataInfo(n_items=N, levels=["b0", "b1"], features={"image": torch.randn(N + 1, 8)},
                    feature_mask={"image": torch.ones(N + 1, dtype=torch.bool)})
    return MODELS[name](ModelConfig(model=name, d=16, layers=2, heads=2, dropout=0.1), info).eval()


@pytest.mark.parametrize("name", ["sasrec", "sasrec-mm"])
def test_sasrec_outputs_ignore_events_at_or_after_the_target(name):
    """SASRec (causal over the deep stream, read at each target's deep history index): a training
    target's user vector is unchanged when events at or after it change, and some later one changes."""
    model = build_sasrec(name)
    batch = make_batch()
    changed = False
    with torch.no_grad():
        y = model.user_vectors(batch)[0]
        for k in range(L):
            y2 = model.user_vectors(perturb_from(batch, batch["target_times"][:, k]))[0]
            valid = batch["targets"][:, k] > 0
            assert torch.allclose(y[valid, k], y2[valid, k], atol=1e-5), k
            changed |= not torch.allclose(y, y2)
    assert changed


def test_bert4rec_never_attends_to_padding():
    """Padding keys are masked: appending padding changes the encoding of no real position."""
    model = build(BERT4Rec).eval()
    x, _ = model.eval_input(make_batch(eval_rows=True))
    padded = torch.cat([x, torch.zeros(len(x), 4, dtype=torch.long)], 1)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(padded)[:, :L]
    real = x > 0
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_diffurec_sampler_keeps_an_exact_denoiser_on_the_noiseless_path(monkeypatch):
    """Posterior-mean steps: if the approximator returns x0 with x_T = sqrt(abar_T) x0, every
    strided step t > s lands on x_s = sqrt(abar_s) x0 (DDPM's q(x_s | x_t, x0) mean)."""
    model = build(DiffuRec, inference_steps=5).eval()
    calls, x0 = [], []

    def exact(h, idx, x_t, t):
        if not x0:
            x0.append(x_t / model.abar[int(t[0, 0])].sqrt())
        calls.append((int(t[0, 0]), x_t))
        return x0[0]

    monkeypatch.setattr(model, "denoise", exact)
    with torch.no_grad():
        model.score(make_batch(eval_rows=True))
    assert [t for t, _ in calls] == model.steps
    for t, x in calls:
        assert torch.allclose(x, model.abar[t].sqrt() * x0[0], atol=1e-5), t


@pytest.mark.parametrize("eps", [torch.zeros_like, torch.ones_like])
def test_diffurec_training_input_is_q_xt_given_x0(monkeypatch, eps):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with x0 = E[target] (eps = 0, then eps = 1)."""
    model = build(DiffuRec)
    batch = make_batch()
    monkeypatch.setattr(torch, "randn_like", eps)
    seen, real = [], model.denoise
    monkeypatch.setattr(model, "denoise", lambda h, idx, x_t, t: seen.append((x_t, t)) or real(h, idx, x_t, t))
    model.loss(batch)
    [(x_t, t)] = seen
    ab = model.abar[t][..., None]
    assert torch.allclose(x_t, ab.sqrt() * model.item(batch["targets"]) + (1 - ab).sqrt() * eps(x_t), atol=1e-6)


def test_diffurec_training_draws_t_from_1_to_T_and_lambda_from_n_delta_delta(monkeypatch):
    """t ~ U{1..T}; lambda ~ N(delta, delta) elementwise; e(t) = MLP(sinusoidal(t * 1000 / T)). Catches
    t never reaching T, a zero-mean lambda and the unscaled t in the time embedding."""
    model = build(DiffuRec)
    batch = make_batch()
    ts, normals, sines = [], [], []
    real_denoise, real_normal, real_sin = model.denoise, torch.normal, sequential.sinusoidal
    monkeypatch.setattr(model, "denoise", lambda h, idx, x_t, t: ts.append(t) or real_denoise(h, idx, x_t, t))
    monkeypatch.setattr(torch, "normal",
                        lambda mean, std, *a, **k: normals.append((mean, std)) or real_normal(mean, std, *a, **k))
    monkeypatch.setattr(sequential, "sinusoidal", lambda t, d: sines.append(t) or real_sin(t, d))
    torch.manual_seed(0)
    for _ in range(20):
        model.loss(batch)
    t = torch.cat(ts)
    assert (t.min().item(), t.max().item()) == (1, model.T)
    assert normals and all(ms == (model.delta, model.delta) for ms in normals)
    assert torch.allclose(torch.cat(sines), t * (1000 / model.T))


def test_diffurec_stochastic_sampler_adds_the_posterior_std():
    """eval_mode='stochastic': x_s = mu(x_t, x0_hat) + sqrt(beta (1 - abar_s) / (1 - abar_t)) z (s > 0), with
    x_T and every z drawn from one generator seeded with sample_seed; the scores come from x0_hat at the
    last step. Checked against the chain recomputed from the same draws."""
    model = build(DiffuRec, eval_mode="stochastic", inference_steps=4).eval()
    batch = make_batch(eval_rows=True)
    x0s = []
    real = model.denoise
    model.denoise = lambda h, idx, x_t, t: x0s.append((x_t, real(h, idx, x_t, t))) or x0s[-1][1]
    with torch.no_grad():
        model.score(batch)
    gen = torch.Generator().manual_seed(model.sample_seed)
    x = torch.randn(6, 1, 16, generator=gen)
    for (x_t, x0_hat), t, s in zip(x0s, model.steps, model.steps[1:] + [0]):
        assert torch.allclose(x_t, x, atol=1e-5), t
        ab_t, ab_s = model.abar[t], model.abar[s]
        beta = 1 - ab_t / ab_s
        x = (ab_s.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - ab_s) * x) / (1 - ab_t)
        if s > 0:
            x = x + (beta * (1 - ab_s) / (1 - ab_t)).sqrt() * torch.randn(x.shape, generator=gen)
    assert len(x0s) == 4


def test_diffurec_cosine_betas_follow_the_documented_formula():
    """abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), beta_t = 1 - abar(t/T) / abar((t-1)/T)."""
    T = 5
    abar = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([1 - abar[t] / abar[t - 1] for t in range(1, T + 1)], dtype=torch.float64)
    assert torch.allclose(diffurec_betas("cosine", T), expected.clamp(max=0.999))


def test_bert4rec_trains_on_the_deep_level_and_survives_rows_without_deep_events():
    """The Cloze loss reads the deep stream only (shallow items change nothing), and a row without deep
    events (it attends anywhere; its outputs are unused) leaves the loss and every gradient finite."""
    model = build(BERT4Rec)
    batch = make_batch()
    shallow = {k: v.clone() for k, v in batch.items()}
    shallow["items"][:, 0][shallow["items"][:, 0] > 0] = 1
    torch.manual_seed(0)
    a = model.loss(batch)["loss"]
    torch.manual_seed(0)
    assert torch.equal(a, model.loss(shallow)["loss"])
    batch["items"][0, -1] = 0
    loss = model.loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mbt_pair_bias_is_indexed_query_behaviour_then_key_behaviour():
    """B[h, b_q, b_k] biases a query of behaviour b_q attending to a key of behaviour b_k: with
    B[:, 0, 1] = -inf-like, behaviour-0 queries ignore behaviour-1 keys (and not the other way round)."""
    torch.manual_seed(0)
    blk = sequential.BehaviourBlock(16, 2, 0.0, 2).eval()
    with torch.no_grad():
        blk.pair[:, 0, 1] = -1e4
        x = torch.randn(1, 4, 16)
        types = torch.nn.functional.one_hot(torch.tensor([[1, 0, 1, 0]]), 2)
        allowed = torch.ones(4, 4, dtype=torch.bool)
        x2 = x.clone()
        x2[0, 2] += torch.randn(16)  # a behaviour-1 key (not a constant shift, which LayerNorm removes)
        a, b = blk(x, types, allowed), blk(x2, types, allowed)
    assert torch.allclose(a[0, [1, 3]], b[0, [1, 3]], atol=1e-5)  # behaviour-0 queries
    assert not torch.allclose(a[0, 0], b[0, 0])  # a behaviour-1 query sees it


def test_mbt_input_is_item_plus_behaviour_type_plus_position():
    """The merged timeline enters as E_item + E_behaviour (levels; BOS and padding: type S) + E_pos."""
    model = build(MBT).eval()
    batch = make_batch()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model.user_vectors(batch)
        it, tm, bh = model.merge(batch["items"], batch["times"])
        expected = model.item(it) + model.behaviour(bh) + model.pos.table(position_ids(tm))
    assert torch.allclose(seen[0], expected)


@pytest.mark.parametrize("name", ["sasrec", "sasrec-mm"])
def test_sasrec_reads_the_latest_deep_event_before_each_target(name):
    """Changing the deep event at a target's history index (the latest before it) changes that
    target's user vector. Catches the input shifted by one, so that the latest event is never read."""
    model = build_sasrec(name)
    batch = make_batch()
    idx = history_index(batch["times"][:, -1:], batch["target_times"])[:, 0]
    with torch.no_grad():
        y = model.user_vectors(batch)[0]
        read = (batch["targets"] > 0) & (idx > 0)  # idx 0: only BOS comes before the target
        assert read.sum() > 10
        for b, k in read.nonzero().tolist():
            pert = {key: v.clone() for key, v in batch.items()}
            pert["items"][b, -1, idx[b, k]] = N
            assert not torch.allclose(model.user_vectors(pert)[0][b, k], y[b, k]), (b, k)


def test_popularity_never_scores_padding():
    """Every user gets the training-target counts, and column 0 (padding) is -inf."""
    counts = torch.arange(N + 1.0)
    model = Popularity(ModelConfig(model="pop"), DataInfo(n_items=N, levels=["b0", "b1"], item_counts=counts))
    s = model.score(make_batch(eval_rows=True))
    assert (s[:, 0] == float("-inf")).all() and torch.equal(s[:, 1:], counts[1:].expand(6, -1))


def test_diffurec_trunc_lin_betas_match_the_documented_ends():
    """trunc_lin: beta from 1000/T * 1e-4 + 0.01 to 1000/T * 0.02 + 0.01 (to 1000/T * 1e-3 + 0.01
    when that end exceeds 1)."""
    b32, b8 = diffurec_betas("trunc_lin", 32), diffurec_betas("trunc_lin", 8)
    assert b32[0].item() == pytest.approx(1000 / 32 * 1e-4 + 0.01)
    assert b32[-1].item() == pytest.approx(1000 / 32 * 0.02 + 0.01)
    assert b8[0].item() == pytest.approx(125 * 1e-4 + 0.01) and b8[-1].item() == pytest.approx(125 * 1e-3 + 0.01)


def test_positions_never_read_an_untrained_embedding():
    """Training records the furthest position back it met; evaluation reads a position further back
    as that one (the oldest events of a history longer than every training row), never an embedding
    training left at its initial draw."""
    from m3bsr.models.layers import Positions
    pos = Positions(8)
    pos(torch.tensor([[0, 3, 2, 1]]))  # training: positions up to 3
    assert int(pos.trained) == 3
    pos.eval()
    assert torch.equal(pos(torch.tensor([5, 4, 3])), pos.table.weight[[3, 3, 3]])
    assert torch.equal(pos(torch.tensor([2, 0])), pos.table.weight[[2, 0]])
    assert "trained" in pos.state_dict()  # saved and resumed with the weights

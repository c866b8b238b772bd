"""The baselines and GERNE as strategies: each against its defining formula on a small case
(float64 oracles written here), and the shared loop's selection, samplers and data sources."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import gerne_kernels.strategies as S
from gerne_kernels.pseudo_groups import pseudo_attributes
from gerne_kernels.sampler import WeightedClassSampler

# the toy data leaves a group empty by chance; the sampler's warning is tested in test_sampler
pytestmark = pytest.mark.filterwarnings("ignore:TwoBatchSampler:UserWarning")


def toy_data(seed=0, n_per_class=60, k=3, n_a=3, minority=0.1, features=5):
    """Gaussian features; the attribute equals the class except for a minority share."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    a = y.clone()
    flip = torch.rand(y.numel(), generator=g) < minority
    a[flip] = (y[flip] + 1 + torch.randint(0, n_a - 1, (int(flip.sum()),), generator=g)) % n_a
    x = torch.randn(y.numel(), features, generator=g, dtype=torch.float64)
    x[:, 0] += y.double()
    x[:, 1] += a.double()
    return x, y, a


def linear_factory(features=5, k=3, seed=0):
    def make():
        torch.manual_seed(seed)
        return torch.nn.Linear(features, k).double()
    return make


def setup_for(x, y, a, batch_size=4, **kw):
    src = S.TensorSource(x, y, a)
    settings = S.OptimizerSettings("sgd", lr=0.5, momentum=0.0, weight_decay=0.0, **kw)
    return S.TrainSetup(linear_factory(x.shape[1], int(y.max()) + 1), src, src, settings,
                        batch_size, torch.device("cpu"))


def batch_of(x, y, a, idx):
    return S.Batch(x[idx], y[idx], a[idx])


def ce64(model, batch):
    """Per-sample cross-entropy in float64, written out: logsumexp - logit of the class."""
    logits = model(batch.x).double()
    return torch.logsumexp(logits, dim=1) - logits.gather(1, batch.y.view(-1, 1)).view(-1)


def sgd_oracle(model, loss_fn, lr):
    """Parameters after one plain SGD step on loss_fn(model), float64."""
    grads = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    return [p.detach() - lr * g for p, g in zip(model.parameters(), grads)]


def assert_params(model, expected, atol=1e-12):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# ERM and group reweighting

def test_erm_step_is_sgd_on_the_mean_cross_entropy():
    x, y, a = toy_data()
    setup = setup_for(x, y, a)
    model = setup.model_factory()
    strategy = S.ERM()
    ctx = S.StepContext(model, strategy.optimizer(model.parameters(), setup.optimizer))
    batch = batch_of(x, y, a, torch.arange(0, 180, 7))
    expected = sgd_oracle(model, lambda m: ce64(m, batch).mean(), 0.5)
    strategy.step(ctx, [batch])
    assert_params(model, expected)


def test_group_weights_are_inverse_group_shares():
    y = torch.tensor([0] * 8 + [1] * 5)
    a = torch.tensor([0] * 6 + [1] * 2 + [1] * 5)  # class 1 has one group: A_1 = 1
    w = S.group_weights(y, a).numpy()
    # class 0: alpha = 6/8, 2/8, A_0 = 2 -> w = 1 / (2 alpha) = 2/3, 2; class 1: alpha 1 -> 1
    np.testing.assert_allclose(w, [[2 / 3, 2.0], [0.0, 1.0]], atol=1e-15)
    # in expectation over class 0's draws every group gets the same total weight 1/A_0
    assert 0.75 * w[0, 0] == pytest.approx(0.25 * w[0, 1]) == pytest.approx(0.5)


def test_reweighting_step_is_sgd_on_the_normalized_weighted_loss():
    x, y, a = toy_data(1)
    setup = setup_for(x, y, a)
    counts = np.zeros((3, 3))
    np.add.at(counts, (y.numpy(), a.numpy()), 1)
    alpha = counts / counts.sum(axis=1, keepdims=True)
    a_y = (counts > 0).sum(axis=1, keepdims=True)
    table = torch.tensor(np.where(counts > 0, 1 / (a_y * np.maximum(alpha, 1e-300)), 0))
    strategy = S.GroupReweighting()
    strategy.prepare(setup)
    model = setup.model_factory()
    ctx = S.StepContext(model, strategy.optimizer(model.parameters(), setup.optimizer))
    idx = torch.cat([torch.nonzero(a != y).view(-1)[:3], torch.arange(0, 180, 11)])
    batch = batch_of(x, y, a, idx)
    w = table[batch.y, batch.a]
    expected = sgd_oracle(model, lambda m: (w * ce64(m, batch)).sum() / w.sum(), 0.5)
    strategy.step(ctx, [batch])
    assert_params(model, expected)


# ---------------------------------------------------------------------------------------------
# GroupDRO

def test_group_losses_are_means_per_group_zero_when_absent():
    losses = torch.tensor([1.0, 3.0, 5.0, 2.0])
    group = torch.tensor([0, 0, 2, 2])
    assert S.group_losses(losses, group, 4).tolist() == [2.0, 0.0, 3.5, 0.0]


def test_group_dro_weights_and_loss_follow_exponentiated_gradient():
    """A hand-written GroupDRO loop in float64 (Sagawa et al., Algorithm 1 with minibatches):
    q_g <- q_g exp(eta L_g), q <- q / sum q, loss sum_g q_g L_g, then an SGD step."""
    x, y, a = toy_data(2)
    setup = setup_for(x, y, a)
    eta, lr, n_a = 0.7, 0.5, 3
    strategy = S.GroupDRO(eta)
    strategy.prepare(setup)
    model, oracle_model = setup.model_factory(), setup.model_factory()
    ctx = S.StepContext(model, strategy.optimizer(model.parameters(), setup.optimizer))
    present = np.zeros(9)
    present[np.unique(y.numpy() * n_a + a.numpy())] = 1
    q = present / present.sum()
    np.testing.assert_allclose(strategy.q.numpy(), q, atol=1e-7)
    sampler = strategy.sampler(y, a, 4, 5, torch.Generator().manual_seed(0))
    for (idx,) in sampler:
        batch = batch_of(x, y, a, idx)
        group = (batch.y * n_a + batch.a).numpy()
        with torch.no_grad():
            per_sample = ce64(oracle_model, batch).numpy()
        losses = np.array([per_sample[group == g].mean() if (group == g).any() else 0.0
                           for g in range(9)])
        q = q * np.exp(eta * losses)
        q = q / q.sum()
        qt = torch.tensor(q)

        def robust(m):
            ps = ce64(m, batch)
            return sum(qt[g] * ps[torch.tensor(group == g)].mean()
                       for g in range(9) if (group == g).any())

        expected = sgd_oracle(oracle_model, robust, lr)
        loss = strategy.step(ctx, [batch])
        assert float(loss) == pytest.approx(float(np.dot(q, losses)), rel=1e-6)
        np.testing.assert_allclose(strategy.q.numpy(), q, rtol=1e-5, atol=1e-7)
        assert_params(model, expected, atol=1e-6)  # q is float32 in the strategy
        with torch.no_grad():
            for p, e in zip(oracle_model.parameters(), expected):
                p.copy_(e)


def test_group_dro_rejects_bad_eta():
    with pytest.raises(ValueError, match="eta"):
        S.GroupDRO(0)


# ---------------------------------------------------------------------------------------------
# JTT

def test_error_set_is_the_misclassified_samples():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    labels = torch.tensor([0, 0, 1, 0])
    assert S.error_set(logits, labels).tolist() == [False, True, True, False]
    assert S.upweights(torch.tensor([False, True]), 5).tolist() == [1.0, 5.0]


def test_jtt_draws_the_error_set_lambda_up_times_as_often():
    y = torch.tensor([0] * 10 + [1] * 6)
    errors = torch.zeros(16, dtype=torch.bool)
    errors[[1, 2, 12]] = True
    lam, steps, bs = 6.0, 500, 8
    s = WeightedClassSampler(y, S.upweights(errors, lam), bs, torch.Generator().manual_seed(3))
    hits = np.zeros(16)
    for _ in range(steps):
        idx = s.sample_b()
        assert torch.bincount(y[idx], minlength=2).tolist() == [bs, bs]
        np.add.at(hits, idx.numpy(), 1)
    u = np.where(errors.numpy(), lam, 1.0)
    for k in (0, 1):
        members = np.flatnonzero(y.numpy() == k)
        p = u[members] / u[members].sum()  # p(i | y) = u_i / sum_{X_y} u
        n = steps * bs
        sd = np.sqrt(n * p * (1 - p))
        assert np.all(np.abs(hits[members] - n * p) <= 5 * sd)


def test_weighted_sampler_errors():
    with pytest.raises(ValueError, match="one entry per sample"):
        WeightedClassSampler(torch.tensor([0, 1]), torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        WeightedClassSampler(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), 2)


def test_jtt_first_stage_snapshots_equal_separate_runs():
    """One constant-lr ERM run recorded at T1 < T2 gives the error sets of runs of T1 and
    T2 steps (the prefix of a run is the shorter run)."""
    x, y, a = toy_data(3)
    setup = setup_for(x, y, a)
    both = S.first_stage_error_sets(setup, [3, 7])
    for t in (3, 7):
        alone = S.JTT(2.0, t)
        alone.prepare(setup)
        assert torch.equal(alone.errors, both[t])
    assert both[3].dtype == torch.bool and both[3].shape == (180,)


def test_jtt_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lambda_up"):
        S.JTT(0.5, 10)
    with pytest.raises(ValueError, match="first_stage_steps"):
        S.JTT(2, 0)


# ---------------------------------------------------------------------------------------------
# GERNE

def test_gerne_step_is_the_extrapolated_gradient():
    x, y, a = toy_data(4)
    setup = setup_for(x, y, a)
    strategy = S.GERNEStrategy(c=0.5, beta=0.8)
    strategy.prepare(setup)
    model, oracle_model = setup.model_factory(), setup.model_factory()
    ctx = S.StepContext(model, strategy.optimizer(model.parameters(), setup.optimizer))
    (idx_b, idx_lb), = list(strategy.sampler(y, a, 4, 1, torch.Generator().manual_seed(0)))
    b, lb = batch_of(x, y, a, idx_b), batch_of(x, y, a, idx_lb)
    expected = sgd_oracle(oracle_model,
                          lambda m: 1.8 * ce64(m, lb).mean() - 0.8 * ce64(m, b).mean(), 0.5)
    strategy.step(ctx, [b, lb])
    assert_params(model, expected)


def test_gerne_beta_from_strength_and_fraction():
    x, y, a = toy_data(5)
    setup = setup_for(x, y, a)
    assert S.GERNEStrategy(c=0.25).beta == pytest.approx(3.0)           # s = 1
    assert S.GERNEStrategy(c=0.5, strength=1.2).beta == pytest.approx(1.4)
    frac = S.GERNEStrategy(c=0.5, beta_frac=0.6)
    frac.prepare(setup)
    assert frac.beta == pytest.approx(0.6 * (frac.bounds.high + 1) - 1, rel=1e-12)
    assert frac.hyperparameters()["s"] == pytest.approx(0.5 * (frac.beta + 1))


def test_gerne_refuses_beta_outside_the_bounds():
    x, y, a = toy_data(6)
    setup = setup_for(x, y, a)
    with pytest.raises(ValueError, match="outside"):
        S.GERNEStrategy(c=0.5, beta=50.0).prepare(setup)
    with pytest.raises(ValueError, match="one of"):
        S.GERNEStrategy(c=0.5, beta=1.0, strength=1.0)


def test_resampling_draws_group_balanced_batches_only():
    x, y, a = toy_data(7)
    s = S.GroupResampling()
    parts = list(s.sampler(y, a, 30, 40, torch.Generator().manual_seed(1)))
    assert all(len(p) == 1 for p in parts)  # beta = 0: no biased batch is drawn
    idx = torch.cat([p[0] for p in parts])
    for k in range(3):
        present = torch.bincount(a[y == k], minlength=3) > 0
        share = torch.bincount(a[idx][y[idx] == k], minlength=3).double() / (30 * 40)
        expected = present.double() / present.sum()  # 1 / A_y on each group present
        assert torch.allclose(share, expected, atol=0.05)


def test_pseudo_group_sizes_are_known_before_the_biased_model():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    s = S.GERNEUnknown(t=0.25)
    # floor(0.25 * 10) = 2, floor(0.25 * 7) = 1, floor(0.25 * 3) = 0
    assert s.pseudo_group_counts(y).tolist() == [[8, 2], [6, 1], [3, 0]]
    scores = torch.randn(20, 3)
    real = pseudo_attributes(scores, y, 0.25)
    for k in range(3):
        assert int(real[y == k].sum()) == s.pseudo_group_counts(y)[k, 1]


def test_gerne_unknown_uses_pseudo_groups_of_the_biased_model():
    x, y, a = toy_data(8)
    setup = setup_for(x, y, a)
    biased = S.biased_model_logits(setup, steps=6)
    strategy = S.GERNEUnknown(t=0.2, c=0.5, beta_frac=0.5, biased=biased)
    strategy.prepare(setup)
    expected = pseudo_attributes(biased.logits, y, 0.2, scores_are="logits")
    assert torch.equal(strategy.attributes, expected)
    assert strategy.bounds.source.count("A=2") == 1
    (idx_b, idx_lb), = list(strategy.sampler(y, a, 5, 1, torch.Generator()))
    assert set(expected[idx_lb].tolist()) <= {0, 1}


# ---------------------------------------------------------------------------------------------
# The loop and the data sources

def test_loop_keeps_the_state_with_the_best_validation_metric():
    x, y, a = toy_data(9)
    setup = setup_for(x, y, a)
    seen = {}

    def remember(step, model):
        seen[step] = [p.detach().clone() for p in model.parameters()]

    result = S.train(setup.model_factory(), S.ERM(), setup,
                     S.LoopSettings(steps=12, eval_every=3, select="wga"), on_step=remember)
    wgas = [h["wga"] for h in result.history]
    assert [h["step"] for h in result.history] == [3, 6, 9, 12]
    best = int(np.argmax(wgas))  # the earliest best
    assert result.best_step == 3 * (best + 1) and result.best_value == wgas[best]
    for p, e in zip(result.model.parameters(), seen[result.best_step]):
        assert torch.equal(p.detach(), e)
    metrics = S.evaluate(result.model, setup.val, "cpu")
    assert metrics["wga"] == pytest.approx(wgas[best])


class RecordingERM(S.ERM):
    """ERM that records the learning rate each step runs with."""

    def __init__(self):
        self.lrs = []

    def step(self, ctx, batches):
        self.lrs.append(ctx.optimizer.param_groups[0]["lr"])
        return super().step(ctx, batches)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(schedule):
    x, y, a = toy_data(10)
    setup = setup_for(x, y, a)
    strategy = RecordingERM()
    S.train(setup.model_factory(), strategy, setup,
            S.LoopSettings(steps=8, eval_every=3, schedule=schedule))
    if schedule == "constant":
        expected = [0.5] * 8
    else:  # lr_i = lr * (1 + cos(pi i / T)) / 2 for the i-th step, i = 0..T-1
        expected = [0.5 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert strategy.lrs == pytest.approx(expected, rel=1e-12)


def checkpoint_run(tmp_path, x, y, a, strategy, stop_after=None, steps=12):
    setup = setup_for(x, y, a)
    return S.train(setup.model_factory(), strategy, setup,
                   S.LoopSettings(steps=steps, eval_every=4, select="gba",
                                  checkpoint=str(tmp_path / "run.pt"), stop_after=stop_after))


@pytest.mark.parametrize("make", [S.ERM, lambda: S.GroupDRO(0.5),
                                  lambda: S.GERNEStrategy(c=0.5, beta=0.5)])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, make):
    x, y, a = toy_data(12)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = checkpoint_run(tmp_path / "a", x, y, a, make())
    first = checkpoint_run(tmp_path / "b", x, y, a, make(), stop_after=1)
    assert not first.finished and first.steps_done == 4
    second = checkpoint_run(tmp_path / "b", x, y, a, make())
    assert second.finished and second.steps_done == 12
    assert second.history == whole.history and second.best_step == whole.best_step
    for p, q in zip(second.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)


def test_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    x, y, a = toy_data(13)
    (tmp_path / "a").mkdir()
    whole = checkpoint_run(tmp_path / "a", x, y, a, S.ERM())
    path = tmp_path / "run.pt"
    checkpoint_run(tmp_path, x, y, a, S.ERM(), stop_after=1)  # checkpoint at step 4
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kw):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process is killed in the middle of writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_run(tmp_path, x, y, a, S.ERM())  # trains to step 8, dies saving it
    assert path.read_bytes() == before  # the previous checkpoint is intact
    monkeypatch.setattr(torch, "save", real_save)
    resumed = checkpoint_run(tmp_path, x, y, a, S.ERM())
    assert resumed.history == whole.history
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    x, y, a = toy_data(14)
    checkpoint_run(tmp_path, x, y, a, S.ERM(), stop_after=1)
    with pytest.raises(ValueError, match="12 steps"):
        checkpoint_run(tmp_path, x, y, a, S.ERM(), steps=20)
    (tmp_path / "run.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot be read"):
        checkpoint_run(tmp_path, x, y, a, S.ERM())


class ListDataset(Dataset):
    def __init__(self, x, y, a):
        self.x, self.labels, self.attributes = x, y, a

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), int(self.attributes[i])


def test_dataset_source_yields_the_same_batches_as_tensors():
    x, y, a = toy_data(11)
    tensors, dataset = S.TensorSource(x, y, a), S.DatasetSource(ListDataset(x, y, a))
    parts = [(torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9])), (torch.tensor([2, 6, 5]),
                                                                   torch.tensor([3, 5, 8]))]
    for got, want in zip(dataset.batches(iter(parts), "cpu"), tensors.batches(iter(parts), "cpu")):
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            assert torch.equal(g.x, w.x) and torch.equal(g.y, w.y) and torch.equal(g.a, w.a)
    model = linear_factory()()
    assert torch.allclose(dataset.logits(model, "cpu"), tensors.logits(model, "cpu"))


def test_loop_settings_are_checked():
    with pytest.raises(ValueError, match="select"):
        S.LoopSettings(steps=3, select="acc")
    with pytest.raises(ValueError, match="steps"):
        S.LoopSettings(steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        S.OptimizerSettings("lion")

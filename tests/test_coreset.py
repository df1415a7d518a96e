"""Tests for bit-wise coreset sampling: scores on hand-made logits, subset planning, determinism, sharding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import anybit
import anybit.data
from anybit.train.coreset import BitwiseCoresetSampler, CoresetError, overlap, sampling_weights


def scored(*args, score: str = "el2n", **kwargs) -> BitwiseCoresetSampler:
    """A sampler that draws by scores (the class's default is uniform subsets, score="random")."""
    return BitwiseCoresetSampler(*args, score=score, **kwargs)
from anybit.train.scores import SCORE_NAMES, ForgettingTracker, el2n, entropy, grand, score_dataset

BITS = [1, 2, 4, 8, 32]
LOG3 = math.log(3.0)

# Three two-class samples, all labelled 0: p = (0.5, 0.5), (0.75, 0.25), (0.25, 0.75).
LOGITS = torch.tensor([[0.0, 0.0], [LOG3, 0.0], [0.0, LOG3]])
LABELS = torch.tensor([0, 0, 0])


# ---------------------------------------------------------------- scores on hand-made logits
def test_el2n_by_hand():
    # ||p - onehot||: sqrt(0.5^2 + 0.5^2), sqrt(0.25^2 + 0.25^2), sqrt(0.75^2 + 0.75^2)
    expected = torch.tensor([0.70710678, 0.35355339, 1.06066017])
    got = el2n(LOGITS, LABELS)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.argsort(descending=True).tolist() == [2, 0, 1]  # the misclassified sample first


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [LOG3, 0.0]])
    # ln 2; -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.21576155 + 0.34657359
    assert torch.allclose(entropy(logits), torch.tensor([0.69314718, 0.56233514]), atol=1e-6)
    assert torch.allclose(entropy(torch.zeros(1, 3)), torch.tensor([1.09861229]), atol=1e-6)  # ln 3
    assert entropy(torch.tensor([[10.0, -10.0], [0.0, 0.0]])).argmax().item() == 1


def test_grand_by_hand():
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    # 0.70710678 * sqrt(25 + 1) = sqrt(13); 0.35355339 * sqrt(0 + 1); 1.06066017 * sqrt(1 + 1) = 1.5
    expected = torch.tensor([3.60555128, 0.35355339, 1.5])
    got = grand(LOGITS, LABELS, feats)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.argsort(descending=True).tolist() == [0, 2, 1]
    assert torch.allclose(grand(LOGITS, LABELS, feats, bias=False), torch.tensor([3.53553391, 0.0, 1.06066017]),
                          atol=1e-6)


def test_grand_matches_autograd_for_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    h = torch.randn(6, 5)
    y = torch.randint(0, 4, (6,))
    expected = []
    for i in range(6):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(h[i:i + 1]), y[i:i + 1]).backward()
        expected.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm())
    with torch.no_grad():
        got = grand(layer(h), y, h)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_forgetting_counts_correct_to_incorrect_transitions():
    tracker = ForgettingTracker(4)
    passes = [[1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]]
    for p in passes:
        tracker.update(torch.tensor(p, dtype=torch.bool))
    # A: 1→0, 1→0 = 2 events; B: never forgotten = 0; C: never learned; D: one 1→0
    assert tracker.counts.tolist() == [2, 0, 0, 1]
    # never-learned samples rank above all others: max(counts) + 1 = 3
    assert tracker.scores().tolist() == [2.0, 0.0, 3.0, 1.0]


def test_forgetting_scored_once_ranks_misclassified_first():
    tracker = ForgettingTracker(3)
    tracker.update(torch.tensor([True, False, True]))
    assert tracker.counts.tolist() == [0, 0, 0]
    assert tracker.scores().tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- planning
def _with_scores(sampler: BitwiseCoresetSampler, bits=BITS, seed=0) -> BitwiseCoresetSampler:
    g = torch.Generator().manual_seed(seed)
    sampler.scores = {b: torch.rand(sampler.num_samples, generator=g) for b in bits}
    sampler.scored_epochs = [sampler.warmup]
    return sampler


@pytest.mark.parametrize("n,fraction,size", [(1000, 0.2, 200), (7, 0.3, 2), (10, 0.0001, 1), (50, 1 / 3, 17)])
def test_subset_sizes_are_exact(n, fraction, size):
    sampler = _with_scores(scored(n, fraction))
    for epoch in range(3):
        plan = sampler.plan_epoch(epoch, BITS)
        assert set(plan) == set(BITS)
        for idx in plan.values():
            assert idx.dtype == torch.long and idx.numel() == size == sampler.subset_size
            assert idx.unique().numel() == size and 0 <= int(idx.min()) and int(idx.max()) < n


def test_disjoint_when_fraction_times_bits_at_most_one():
    sampler = _with_scores(scored(1000, 0.2))
    for epoch in range(3):
        plan = sampler.plan_epoch(epoch, BITS)
        union = torch.cat(list(plan.values()))
        assert union.unique().numel() == 1000  # 5 x 200: a partition of the data
        assert overlap(plan) == 0.0
    plan = scored(1000, 0.1).plan_epoch(0, BITS)  # warm-up (no scores) too
    assert torch.cat(list(plan.values())).unique().numel() == 500


def test_overlap_is_spread_evenly_when_unavoidable():
    sampler = _with_scores(scored(100, 0.5), bits=[2, 4, 8])
    plan = sampler.plan_epoch(0, [2, 4, 8])
    uses = torch.bincount(torch.cat(list(plan.values())), minlength=100)
    assert int(uses.min()) == 1 and int(uses.max()) == 2  # 150 draws over 100 samples: each used once or twice
    assert uses.sum() == 150
    assert 0.0 < overlap(plan) < 0.5


def test_subsets_differ_across_bits_and_epochs():
    sampler = _with_scores(scored(500, 0.1))
    a, b = sampler.plan_epoch(3, BITS), sampler.plan_epoch(4, BITS)
    for bits in BITS:
        assert set(a[bits].tolist()) != set(b[bits].tolist())
    assert set(a[1].tolist()) != set(a[2].tolist())


def test_every_sample_keeps_a_chance_and_scores_matter():
    n = 40
    scores = torch.zeros(n)
    scores[20:] = 1.0  # half the samples score 0
    w = sampling_weights(scores, n)
    assert bool((w > 0).all())
    sampler = scored(n, 0.25)
    sampler.scores = {4: scores}
    counts = torch.zeros(n)
    for epoch in range(200):
        counts[sampler.plan_epoch(epoch, [4])[4]] += 1
    assert bool((counts[:20] > 0).all())  # zero-score samples still drawn
    assert counts[20:].sum() > 4 * counts[:20].sum()  # but much less often
    assert sampling_weights(None, 5).tolist() == [1.0] * 5
    assert sampling_weights(torch.zeros(5), 5).tolist() == [1.0] * 5


def test_warmup_plans_are_random_and_bitwise_different():
    sampler = scored(300, 0.2, warmup=2)
    sampler.scores = {b: torch.linspace(0, 1, 300) for b in BITS}  # ignored before epoch 2
    assert torch.equal(sampler.weights(4, 1), torch.ones(300))
    assert not torch.equal(sampler.weights(4, 2), torch.ones(300))
    plan = sampler.plan_epoch(0, BITS)
    assert len({tuple(sorted(v.tolist())) for v in plan.values()}) == len(BITS)


def test_determinism_and_state_round_trip():
    one = _with_scores(scored(400, 0.2, seed=7))
    two = _with_scores(scored(400, 0.2, seed=7))
    for epoch in range(3):
        p, q = one.plan_epoch(epoch, BITS), two.plan_epoch(epoch, list(reversed(BITS)))
        assert all(torch.equal(p[b], q[b]) for b in BITS)
    other = _with_scores(scored(400, 0.2, seed=8))
    assert not torch.equal(one.plan_epoch(0, BITS)[4], other.plan_epoch(0, BITS)[4])

    state = one.state_dict()
    json.dumps(state["config"]), json.dumps(state["scored_epochs"])
    fresh = scored(400, 0.2, seed=7)
    fresh.load_state_dict(state)
    for epoch in (5, 6):
        p, q = one.plan_epoch(epoch, BITS), fresh.plan_epoch(epoch, BITS)
        assert all(torch.equal(p[b], q[b]) for b in BITS)
    with pytest.raises(CoresetError, match="seed: saved 7, now 9"):
        scored(400, 0.2, seed=9).load_state_dict(state)


def test_rank_sharding_partitions_the_subset():
    for n, world in ((1000, 4), (1010, 4)):  # subset 200 (divisible) and 202 (padded to 204)
        full = _with_scores(scored(n, 0.2)).global_plan(1, BITS)
        shards = [_with_scores(scored(n, 0.2, rank=r, world_size=world)).plan_epoch(1, BITS)
                  for r in range(world)]
        for b in BITS:
            sizes = {s[b].numel() for s in shards}
            assert sizes == {math.ceil(full[b].numel() / world)}
            joined = torch.cat([s[b] for s in shards])
            assert set(joined.tolist()) == set(full[b].tolist())
            if full[b].numel() % world == 0:
                assert joined.numel() == full[b].numel()  # an exact partition
    with pytest.raises(CoresetError, match="rank"):
        BitwiseCoresetSampler(10, rank=2, world_size=2)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_fraction_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"fraction=.*\(0, 1\]"):
        BitwiseCoresetSampler(100, bad)


def test_full_fraction_and_bad_names():
    sampler = BitwiseCoresetSampler(100, 1.0)
    assert sampler.plan_epoch(0, BITS) == {b: None for b in BITS}
    assert not sampler.needs_scoring(0)
    assert overlap({1: None, 2: None}) == 1.0 and sampler.overlap({1: None, 2: torch.arange(50)}) == 0.5
    with pytest.raises(ValueError, match="el2n, grand, entropy, forgetting, random"):
        BitwiseCoresetSampler(100, score="loss")
    with pytest.raises(CoresetError, match="twice"):
        sampler.plan_epoch(0, [4, 4])


def test_scoring_schedule():
    sampler = scored(10, 0.5, warmup=2, refresh=3)
    assert [sampler.needs_scoring(e) for e in range(3)] == [False, False, True]
    sampler.scores, sampler.scored_epochs = {4: torch.ones(10)}, [2]
    assert [sampler.needs_scoring(e) for e in range(2, 10)] == [False, False, False, True, False, False, True, False]
    once = scored(10, 0.5)
    assert once.needs_scoring(0)
    once.scores, once.scored_epochs = {4: torch.ones(10)}, [0]
    assert not any(once.needs_scoring(e) for e in range(10))
    assert not BitwiseCoresetSampler(10, 0.5, score="random").needs_scoring(0)


# ---------------------------------------------------------------- scoring a real (tiny) model
def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return anybit.convert(model, act="fixed", act_range=(0.0, 2.0), keep_first_last=None)


@pytest.fixture(scope="module")
def synthetic():
    return anybit.data.load("synthetic", "train", augment=True, num_samples=48, image_size=8)


@pytest.mark.parametrize("score", ["el2n", "grand", "entropy"])
def test_update_scores_differ_between_bit_widths(synthetic, score):
    model = _tiny_model().train()
    anybit.set_precision(model, 4)
    sampler = BitwiseCoresetSampler(len(synthetic), 0.25, score=score, batch_size=16)
    acct = sampler.update_scores(model, synthetic, [1, 4, 32], epoch=0, device="cpu")
    assert acct["samples_scored"] == 3 * 48 and acct["seconds"] >= sum(v["seconds"] for v in acct["per_bits"].values())
    assert set(sampler.scores) == {1, 4, 32}
    assert all(s.shape == (48,) and bool(torch.isfinite(s).all()) for s in sampler.scores.values())
    assert not torch.allclose(sampler.scores[1], sampler.scores[32])
    # state restored: training mode, precision, augmentation
    assert model.training and synthetic.augment is True
    assert set(anybit.get_precision(model).values()) == {(4, 4)}
    # scored on the un-augmented view, so scoring twice gives the same numbers
    first = {b: s.clone() for b, s in sampler.scores.items()}
    sampler.update_scores(model, synthetic, [1, 4, 32], epoch=1, device="cpu")
    assert all(torch.equal(first[b], sampler.scores[b]) for b in first)
    plan = sampler.plan_epoch(1, [1, 4, 32])
    assert all(v.numel() == 12 for v in plan.values()) and overlap(plan) == 0.0


def test_update_scores_at_float_match_manual_el2n_and_grand(synthetic):
    model = _tiny_model().eval()
    synthetic.augment = False
    try:
        x = torch.stack([synthetic[i][0] for i in range(len(synthetic))])
    finally:
        synthetic.augment = True
    with torch.no_grad():
        feats = model[:-1](x)
        logits = model[-1](feats)
    y = synthetic.targets
    scores, _ = score_dataset(model, synthetic, [32], "el2n", "cpu", batch_size=20)
    assert torch.allclose(scores[32], el2n(logits, y), atol=1e-5)
    scores, _ = score_dataset(model, synthetic, [32], "grand", "cpu", batch_size=20)
    assert torch.allclose(scores[32], grand(logits, y, feats), atol=1e-4)


def test_forgetting_and_random_through_update_scores(synthetic):
    model = _tiny_model()
    forget = BitwiseCoresetSampler(len(synthetic), 0.25, score="forgetting", refresh=1, batch_size=48)
    forget.update_scores(model, synthetic, [2, 32], epoch=0, device="cpu")
    assert set(forget.trackers) == {2, 32} and forget.trackers[2].passes == 1
    assert set(forget.scores[2].unique().tolist()) <= {0.0, 1.0}
    restored = BitwiseCoresetSampler(len(synthetic), 0.25, score="forgetting", refresh=1, batch_size=48)
    restored.load_state_dict(forget.state_dict())
    assert torch.equal(restored.trackers[2].counts, forget.trackers[2].counts)

    rand = BitwiseCoresetSampler(len(synthetic), 0.25, score="random")
    acct = rand.update_scores(model, synthetic, [2, 32], epoch=0, device="cpu")
    assert acct["samples_scored"] == 0 and rand.scores == {}
    with pytest.raises(CoresetError, match="num_samples=10"):
        scored(10).update_scores(model, synthetic, [2], epoch=0, device="cpu")
    assert set(SCORE_NAMES) == {"el2n", "grand", "entropy", "forgetting", "random"}


def test_build_sampler_from_trainer_options():
    from types import SimpleNamespace

    from anybit.train.coreset import build_sampler

    opts = SimpleNamespace(fraction=0.1, score="entropy", refresh=2, warmup=1, seed=3, shared_subset=True)
    sampler = build_sampler(opts, list(range(90)), BITS, rank=1, world_size=2)
    assert (sampler.num_samples, sampler.subset_size, sampler.shard_size) == (90, 9, 5)
    assert sampler.describe()["sampler"] == "bitwise-coreset" and sampler.rank == 1
    plan = sampler.global_plan(0, BITS)
    assert overlap(plan) == 1.0  # shared_subset: one subset for every bit-width


def test_untrained_learned_ranges_skip_scoring_until_next_epoch(synthetic):
    torch.manual_seed(0)
    model = anybit.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                         nn.Linear(4, 10)), keep_first_last=None)  # learned ranges, never trained
    sampler = scored(len(synthetic), 0.25)
    with pytest.warns(UserWarning, match="skipped"):
        info = sampler.update_scores(model, synthetic, [2, 32], epoch=0, device="cpu")
    assert info["samples_scored"] == 0 and info["skipped"] and sampler.scores == {}
    assert sampler.needs_scoring(1)


def test_trainer_runs_with_the_sampler(synthetic):
    from anybit.train import MultiBitTrainer, TrainConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    sampler = scored(len(synthetic), 0.25, warmup=1, batch_size=48)
    config = TrainConfig(bits=(2, 4, 32), method="emqnet", epochs=2, batch_size=4, eval_every=0, coreset_score="el2n",
                         keep_first_last=None)   # two layers: pinned, they would leave nothing to quantize
    result = MultiBitTrainer(model, synthetic, None, config, sampler=sampler, quiet=True).fit()
    assert sampler.scored_epochs == [1]
    assert [r["overlap"] for r in result["history"]][0] == {"32-4": 0.0, "32-2": 0.0, "4-2": 0.0}
    assert result["samples"][2]["train"] == 2 * 12 and result["samples"][2]["scoring"] == 48

"""Stratified splits and the on-device loader: exact properties checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mentor.data import DeviceLoader, stratified_split, stratified_subset
from mentor.data.loader import IndexSchedule, epoch_seed

# ---------------------------------------------------------------------------------------- splits


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=60),
    frac=st.floats(0, 1),
    seed=st.integers(0, 99),
)
def test_split_properties(labels, frac, seed):
    train, val = stratified_split(labels, frac, seed)
    n = len(labels)
    both = torch.cat([train, val]).sort().values
    assert both.tolist() == list(range(n))  # disjoint and covering
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())
    assert len(val) == round(frac * n)
    arr = np.asarray(labels)
    for c in set(labels):  # each class within one of its exact share
        exact = (arr == c).sum() * len(val) / n
        assert abs((arr[val.numpy()] == c).sum() - exact) < 1
    again = stratified_split(torch.tensor(labels), frac, seed)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)


def test_largest_remainder_by_hand():
    # Class sizes 5, 3, 2 and 5 validation items: exact shares 2.5, 1.5, 1.0 -> floors 2, 1, 1 and the
    # one leftover slot goes to the first of the tied remainders (class 0): 3, 1, 1.
    labels = [0] * 5 + [1] * 3 + [2] * 2
    _, val = stratified_split(labels, 5, seed=3)
    assert np.bincount(np.asarray(labels)[val.numpy()]).tolist() == [3, 1, 1]


def test_split_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    a = stratified_split(labels, 0.1, seed=0)[1]
    b = stratified_split(labels, 0.1, seed=1)[1]
    assert not torch.equal(a, b)
    assert np.bincount(labels[a.numpy()]).tolist() == [10] * 10
    assert torch.equal(a, stratified_split(labels, 100, seed=0)[1])  # 0.1 of 1000 == 100
    # Pinned: RandomState's stream is frozen, so this split must survive NumPy and torch upgrades.
    assert a[:8].tolist() == [1, 14, 27, 31, 45, 55, 60, 65]


def test_split_sizes_validated():
    with pytest.raises(ValueError, match="outside"):
        stratified_split([0, 1], 3, 0)
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1], 1.5, 0)
    with pytest.raises(ValueError, match="non-negative integers"):
        stratified_split([0.5, 1.0], 1, 0)


def test_subset():
    labels = torch.arange(1000) % 4
    idx = stratified_subset(labels, 100, seed=7)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and int(idx.max()) < 1000
    assert torch.bincount(labels[idx]).tolist() == [25, 25, 25, 25]
    assert torch.equal(idx, stratified_subset(labels, 0.1, seed=7))


# ---------------------------------------------------------------------------------------- loader


def make(n: int = 50, **kw):
    # Image i is filled with the value i, so a batch's images say which samples it holds.
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n) % 7
    return DeviceLoader(images, labels, **kw), labels


def test_long_tailed_subset_keeps_the_exponential_profile():
    from mentor.data.splits import long_tailed_subset

    labels = torch.arange(5).repeat_interleave(torch.tensor([40, 50, 60, 45, 41]))  # smallest class: 40
    pos = long_tailed_subset(labels, 16.0, seed=3)
    # 40 * 16 ** (-c / 4) = 40, 20, 10, 5, 2.5 -> floor
    assert torch.bincount(labels[pos]).tolist() == [40, 20, 10, 5, 2]
    assert torch.equal(pos, long_tailed_subset(labels, 16.0, seed=3)) and torch.equal(pos, pos.sort().values)
    assert not torch.equal(pos, long_tailed_subset(labels, 16.0, seed=4))
    assert torch.bincount(labels[long_tailed_subset(labels, 1e6, seed=0)]).tolist() == [40, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        long_tailed_subset(labels, 0.5, seed=0)


def test_unlabeled_imbalance_shapes_only_the_pool():
    pytest.importorskip("sklearn")
    from mentor.config import ConfigError, load_config
    from mentor.engine.inputs import load_splits

    s = load_splits(load_config(None, ["data.name=digits", "data.val_size=200", "data.labels_per_class=4",
                                       "data.unlabeled_imbalance=10"]).data)
    assert torch.bincount(s.train.labels).tolist() == [4] * 10
    counts = torch.bincount(s.unlabeled.labels)
    assert counts[0] == 97 and counts[-1] == 9  # smallest class of the 998 training digits: 97
    with pytest.raises(ConfigError, match="data.unlabeled_imbalance=10.0 shapes the unlabelled pool"):
        load_config(None, ["data.name=digits", "data.unlabeled_imbalance=10"])


def test_batch_matches_its_indices():
    loader, labels = make(batch_size=8, seed=0)
    x, y = loader.batch(3)
    idx = x[:, 0, 0, 0].long()
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 2, 2) and y.dtype == torch.int64
    assert torch.equal(y, labels[idx]) and torch.equal(idx, loader.indices(3))


def test_pure_function_of_seed_and_step():
    a, _ = make(batch_size=8, seed=5)
    b, _ = make(batch_size=8, seed=5)
    steps = [13, 0, 6, 7, 13, 2]  # out of order, across epochs, repeated
    for s in steps:
        assert torch.equal(a.batch(s)[0], b.batch(s)[0])
    assert [a.indices(s).tolist() for s in steps] == [make(batch_size=8, seed=5)[0].indices(s).tolist()
                                                      for s in steps]
    c, _ = make(batch_size=8, seed=6)
    assert not torch.equal(a.indices(0), c.indices(0))


def test_permutation_is_the_documented_one():
    loader, _ = make(n=30, batch_size=4, seed=11)
    epoch, i = divmod(9, loader.steps_per_epoch)  # 7 steps per epoch
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(epoch_seed(11, epoch)))
    assert loader.indices(9).tolist() == perm[i * 4 : (i + 1) * 4].tolist()


def test_epoch_coverage():
    loader, _ = make(n=48, batch_size=6, seed=1)
    assert loader.steps_per_epoch == len(loader) == 8
    for epoch in range(3):
        seen = torch.cat([loader.indices(epoch * 8 + i) for i in range(8)])
        assert sorted(seen.tolist()) == list(range(48))  # every index exactly once
    first = torch.cat([loader.indices(i) for i in range(8)])
    second = torch.cat([loader.indices(8 + i) for i in range(8)])
    assert not torch.equal(first, second)  # a fresh order each epoch


def test_drop_last():
    loader, _ = make(n=50, batch_size=8, seed=1)
    assert loader.steps_per_epoch == 6
    seen = torch.cat([loader.indices(i) for i in range(6)]).tolist()
    assert len(seen) == len(set(seen)) == 48
    full, _ = make(n=50, batch_size=8, seed=1, drop_last=False)
    assert full.steps_per_epoch == 7
    seen = torch.cat([full.indices(i) for i in range(7)]).tolist()
    assert set(seen) == set(range(50)) and len(seen) == 56  # padded by wrapping round
    assert full.batch(6)[0].shape[0] == 8


def test_rank_sharding_union():
    world, b = 3, 4
    single, _ = make(n=50, batch_size=b * world, seed=9)
    ranks = [make(n=50, batch_size=b, seed=9, rank=r, world_size=world)[0] for r in range(world)]
    assert ranks[0].steps_per_epoch == single.steps_per_epoch == 50 // 12
    for step in (0, 3, 4, 11):
        union = torch.cat([r.batch(step)[0] for r in ranks])
        assert torch.equal(union, single.batch(step)[0])
    assert len(set(torch.cat([r.indices(0) for r in ranks]).tolist())) == 12  # disjoint shards


def test_split_smaller_than_a_batch_is_repeated_evenly():
    # 10 samples, global batch 16: two copies per epoch, so each sample appears exactly twice in the
    # epoch's single step (counted by hand over both ranks) and the ranks' shards are the epoch's order.
    ranks = [make(n=10, batch_size=8, seed=0, rank=r, world_size=2)[0] for r in range(2)]
    assert ranks[0].copies == 2 and ranks[0].steps_per_epoch == 1
    for step in (0, 1, 5):
        drawn = torch.cat([r.indices(step) for r in ranks]).tolist()
        counts = torch.bincount(torch.tensor(drawn), minlength=10)
        assert counts.max() <= 2 and counts.sum() == 16
    # 40 labels, batch 64 (the SSL setting): never raises, 64 labels per step, each label <= 2 times.
    sched = IndexSchedule(40, 64, seed=3)
    assert sched.copies == 2 and sched.steps_per_epoch == 1
    assert torch.bincount(sched.indices(7), minlength=40).max() <= 2


def test_loader_validates():
    with pytest.raises(ValueError, match="rank"):
        make(batch_size=2, seed=0, rank=2, world_size=2)
    small, _ = make(n=5, batch_size=4, seed=0, world_size=2, drop_last=False)
    assert small.steps_per_epoch == 1 and small.batch(0)[0].shape[0] == 4


def test_epoch_seed_distinct():
    seeds = {epoch_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_matches_cpu():
    cpu, _ = make(n=50, batch_size=8, seed=4)
    gpu, _ = make(n=50, batch_size=8, seed=4, device="cuda")
    for step in (0, 6, 7):
        x, y = gpu.batch(step)
        assert x.is_cuda and y.is_cuda
        assert torch.equal(x.cpu(), cpu.batch(step)[0]) and torch.equal(y.cpu(), cpu.batch(step)[1])

"""Global near-duplicate search: every search (block covering, multi-index probing, the Ray Data
shuffle) exact against brute force; real re-encoded/resized/brightened copies found while distinct
photos stay apart."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import ImageEnhance

from curation import dedup, samples
from curation.decode import decode
from curation.scorers import phash64


def _brute(h: np.ndarray, d: int) -> set[tuple[int, int]]:
    x = h[:, None] ^ h[None, :]
    dist = np.bitwise_count(x)
    i, j = np.nonzero(np.triu(dist <= d, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def _planted(d: int) -> np.ndarray:
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    # Plant neighbours at distances around d.
    flips = []
    for k in range(150):
        bits = rng.choice(64, size=int(rng.integers(1, d + 3)), replace=False)
        flips.append(base[k] ^ np.uint64(sum(1 << int(b) for b in bits)))
    return np.unique(np.concatenate([base, np.array(flips, np.uint64)]))


@pytest.mark.parametrize("d", [1, 3, 6, 10])
@pytest.mark.parametrize("how", [None, ("probe", 4), ("cover", 3), ("cover", 5)])
def test_near_pairs_equal_brute_force(d, how):
    h = _planted(d)
    i, j = dedup.near_pairs(h, d, how)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute(h, d)


@pytest.mark.parametrize("key_bits", [0, 4, 12])
def test_sorted_pairs_long_runs_equal_brute_force(key_bits):
    """Runs of many hashes sharing a short key: every (p, p + k) inside a run is checked, none across."""
    h = _planted(6)
    v = h.copy()
    x, y = dedup.sorted_pairs(v, key_bits, 6)
    top = (lambda a: a >> np.uint64(64 - key_bits)) if key_bits else (lambda a: a * np.uint64(0))
    idx = {int(a): i for i, a in enumerate(h.tolist())}
    got = {tuple(sorted((idx[int(a)], idx[int(b)]))) for a, b in zip(x.tolist(), y.tolist(), strict=True)}
    want = {(i, j) for i, j in _brute(h, 6) if top(h[i]) == top(h[j])}
    assert got == want and len(got) == len(x)


def test_unsorted_input_gives_indices_into_it():
    h = _planted(6)
    perm = np.random.default_rng(1).permutation(len(h))
    i, j = dedup.near_pairs(h[perm], 6, ("cover", 4))
    back = {tuple(sorted((int(perm[a]), int(perm[b])))) for a, b in zip(i.tolist(), j.tolist(), strict=True)}
    assert back == _brute(h, 6)


@pytest.mark.parametrize("s,d", [(4, 6), (5, 6), (6, 4), (3, 10)])
def test_covering_keys_survive_every_dirty_block_set(s, d):
    """The pigeonhole the search rests on: every set of d dirty blocks misses some key entirely."""
    keys = [set(k) for k in dedup.covering(s, d)]
    assert all(len(k) == s for k in keys)
    for dirty in itertools.combinations(range(dedup.BLOCKS), d):
        assert any(not k.intersection(dirty) for k in keys), dirty


@pytest.mark.parametrize("prefix", [(), (2, 9), (9,)])
def test_permute_is_a_bit_permutation_with_the_prefix_then_the_key_on_top(prefix):
    h = np.random.default_rng(0).integers(0, 2**64 - 1, 1000, dtype=np.uint64, endpoint=True)
    key = (1, 2, 6, 9, 13)
    dest = dedup.placement(key, prefix)
    v = dedup.permute(h, dest)
    assert (dedup.permute(v, dest, inverse=True) == h).all()
    assert (np.bitwise_count(v) == np.bitwise_count(h)).all()
    assert (np.bitwise_count(v[1:] ^ v[:-1]) == np.bitwise_count(h[1:] ^ h[:-1])).all()
    nib = lambda a, pos: (a >> np.uint64(4 * pos)) & np.uint64(15)  # noqa: E731
    for i, b in enumerate(prefix):  # the prefix's blocks on top, in its order
        assert (nib(v, 15 - i) == nib(h, b)).all()
    top = {int(q) for q in range(16 - len(key), 16)}  # then the key's other blocks
    assert {dest[b] for b in key} == top


def test_each_pair_reported_once_at_its_first_key(monkeypatch):
    """A pair shares dozens of keys; the search keeps it at the first one only, with the keys
    ordered by prefix groups and the sort cut into chunks between prefix values."""
    h = _planted(6)
    monkeypatch.setattr(dedup, "_SORT_CHUNK", 64)  # 2-block prefixes and many chunks on 450 hashes
    assert dedup._prefix_blocks(len(h), 5) == 2
    batches = list(dedup.candidate_pairs(h, 6, ("cover", 5)))
    got = [(a, b) for i, j in batches for a, b in zip(i.tolist(), j.tolist(), strict=True)]
    assert len(got) == len(set(got)) and set(got) == _brute(h, 6)


def test_plan_widens_keys_with_n():
    """Keys grow about log2(n) bits wide, so random key collisions (n^2 / 2^bits) stay ~ n."""
    widths = [dedup.plan(n, 6) for n in (10**5, 10**6, 10**8)]
    assert [w[0] for w in widths[1:]] == ["cover", "cover"]
    assert widths[2][1] > widths[1][1]


def _phash_of(data: bytes) -> int:
    return phash64(decode(data, 256, 10**9).image.convert("L"))


def test_real_copies_found_and_distinct_photos_apart():
    photos = dict(samples.real_photos())
    names = sorted(photos)
    hashes, labels = [], []
    for n in names:
        hashes.append(_phash_of(samples.jpeg(photos[n])))
        labels.append(n)
    for n in ("astronaut", "coffee", "china", "rocket"):
        im = photos[n]
        variants = {
            "q35": samples.jpeg(im, 35),
            "resized": samples.jpeg(im.resize((im.width * 2 // 3, im.height * 2 // 3))),
            "bright": samples.jpeg(ImageEnhance.Brightness(im).enhance(1.2)),
            "png": samples.png(im),
        }
        for v, data in variants.items():
            hashes.append(_phash_of(data))
            labels.append(f"{n}:{v}")
    h = np.array(hashes, np.uint64)
    comp = dedup.cluster(h, np.array([str(i) for i in range(len(h))]), 6)
    by = dict(zip(labels, comp.tolist(), strict=True))
    for n in ("astronaut", "coffee", "china", "rocket"):
        for v in ("q35", "resized", "bright", "png"):
            assert by[f"{n}:{v}"] == by[n], f"{n}:{v} not clustered with {n}"
    originals = [by[n] for n in names]
    assert len(set(originals)) == len(originals), "distinct photos were merged"


def test_exact_duplicates_by_content_hash_even_with_unrelated_phash():
    h = np.array([1, 2**40, 2**63], np.uint64)
    comp = dedup.cluster(h, np.array(["a", "b", "a"]), 1)  # pairwise distance 2
    assert comp[0] == comp[2] != comp[1]


def test_survivor_is_largest_then_smallest_id():
    labels = np.array([0, 0, 0, 1, 1])
    area = np.array([100, 400, 400, 5, 5])
    ids = np.array(["c", "b", "a", "z", "y"])
    assert dedup.survivors(labels, area, ids).tolist() == [2, 2, 2, 4, 4]


def test_flood_of_identical_hashes_is_cheap():
    h = np.zeros(200_000, np.uint64)
    comp = dedup.cluster(h, np.arange(len(h)).astype(str), 6)
    assert len(set(comp.tolist())) == 1


def test_components_merge_repeated_and_chained_pairs():
    c = dedup.Components(6)
    c.add(np.array([0, 0, 3]), np.array([1, 1, 4]))
    c.add(np.array([1]), np.array([2]))
    lab = c.merge()
    assert lab[0] == lab[1] == lab[2] != lab[3] == lab[4] != lab[5]


def test_distributed_config_field_gives_the_same_decisions(ray_local):
    """``thresholds.dedup.distributed`` reaches the decision pass's dedup rule (the ``FILTERS`` entry
    it calls) and changes nothing but where the key join runs: same losers, same survivors."""
    from curation.config import load_config
    from curation.filters import FILTERS

    rng = np.random.default_rng(3)
    phash = np.concatenate([_planted(6), _planted(3)])
    n = len(phash)
    content = rng.integers(0, n // 2, n).astype(np.uint64)  # some exact copies with unrelated pHashes
    c = {"phash": phash, "content": content, "area": rng.integers(1, 5, n) * 100,
         "id": np.array([f"id{i:05d}" for i in rng.permutation(n)], object)}
    out = {}
    for flag in (False, True):
        cfg = load_config(None, {"thresholds.dedup.distributed": flag})
        assert cfg.thresholds.dedup.distributed is flag
        out[flag] = FILTERS["dedup"].decide_global(c, cfg.thresholds.dedup, cfg)
    (lose_a, cols_a), (lose_b, cols_b) = out[False], out[True]
    assert lose_a.sum() > n // 4 and (lose_a == lose_b).all()
    assert cols_a["dup_of"].tolist() == cols_b["dup_of"].tolist()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_distributed_config_field_rejects_a_non_bool_at_load(value):
    from common.typed_config import ConfigError
    from curation.config import load_config

    with pytest.raises(ConfigError, match=r"thresholds\.dedup\.distributed"):
        load_config(None, {"thresholds.dedup.distributed": value})

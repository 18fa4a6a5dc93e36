"""Global near-duplicate search: exact against brute force, and real re-encoded/resized/brightened
copies found while distinct photos stay apart."""

from __future__ import annotations

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


@pytest.mark.parametrize("d", [1, 3, 6, 10])
def test_near_pairs_equal_brute_force(d):
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    # Plant neighbours at distances around d.
    flips = []
    for k in range(150):
        bits = rng.choice(64, size=int(rng.integers(1, d + 3)), replace=False)
        flips.append(base[k] ^ np.uint64(sum(1 << int(b) for b in bits)))
    h = np.unique(np.concatenate([base, np.array(flips, np.uint64)]))
    i, j = dedup.near_pairs(h, d)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute(h, d)


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

"""Seeded, stratified samples of examples: the one draw every stage (splits, the labelled budget,
`task.max_examples`, importance and calibration texts) takes the same way."""
from __future__ import annotations


def take_per_class(examples: list[dict], key: str | None, seed: int, count) -> list[int]:
    """Sorted indices of `count(cls, size)` examples of each class: every class shuffled, in sorted
    class order, by one generator seeded with `seed` (the same draw for the same data and seed)."""
    import random

    by_class: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_class.setdefault(str(ex.get(key, "")), []).append(i)
    rng = random.Random(seed)
    taken = []
    for cls in sorted(by_class):
        idx = by_class[cls][:]
        rng.shuffle(idx)
        taken += idx[: count(cls, len(idx))]
    return sorted(taken)


def subset_indices(examples: list[dict], n: int | None, seed: int, key: str | None = "label") -> list[int]:
    """Indices (in order) of an n-example subset: for labelled examples a seeded stratified sample, each
    class keeping its share (largest remainders first), so a subset of a file sorted by label (as
    Banking77 is) still covers every class; without `key`, the first n."""
    from collections import Counter

    if not n or n >= len(examples):
        return list(range(len(examples)))
    if key is None:
        return list(range(n))
    sizes = Counter(str(ex.get(key, "")) for ex in examples)
    exact = {c: n * size / len(examples) for c, size in sizes.items()}
    quota = {c: int(x) for c, x in exact.items()}
    for c in sorted(sizes, key=lambda c: (-(exact[c] - quota[c]), c))[: n - sum(quota.values())]:
        quota[c] += 1
    return take_per_class(examples, key, seed, lambda cls, size: quota[cls])

"""Subject patterns, the routing trie, header filters and the token bucket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chute.core.filters import compile_filter
from chute.core.ratelimit import TokenBucket
from chute.core.routing import Pattern, SubjectIndex, validate_pattern, validate_subject
from chute.errors import InvalidArgument, InvalidName

WORDS = st.sampled_from(["a", "b", "c"])
SUBJECTS = st.lists(WORDS, min_size=1, max_size=4).map(".".join)
PATTERNS = st.builds(
    lambda words, tail: ".".join(words + ([">"] if tail else [])) or ">",
    st.lists(st.sampled_from(["a", "b", "*"]), max_size=3),
    st.booleans(),
)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("orders.*.eu", "orders.new.eu", True),
        ("orders.*.eu", "orders.new.x.eu", False),
        ("orders.>", "orders.a", True),
        ("orders.>", "orders.a.b", True),
        ("orders.>", "orders", False),
        (">", "anything.at.all", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
    ],
)
def test_pattern_semantics(pattern, subject, expected):
    assert Pattern(pattern).matches(subject) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a*", ">a", "a b", "é", ".a", "a.", 5, "x" * 256])
def test_bad_patterns(bad):
    with pytest.raises(InvalidName):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["", "a.*", "a.>", "a..b", "a b", None])
def test_bad_subjects(bad):
    with pytest.raises(InvalidName):
        validate_subject(bad)


@given(st.lists(PATTERNS, max_size=8), st.lists(st.integers(0, 7), max_size=4), SUBJECTS)
def test_index_agrees_with_brute_force(patterns, removals, subject):
    index = SubjectIndex()
    values = [(i, p) for i, p in enumerate(patterns)]
    for value in values:
        index.add(value[1], value)
    kept = list(values)
    for i in removals:
        if i < len(values):
            index.remove(values[i][1], values[i])
            kept = [v for v in kept if v is not values[i]]
    assert index.match(subject) == [v for v in kept if Pattern(v[1]).matches(subject)]


def test_filters():
    spec = {
        "region": "eu",
        "tier": {"in": ["gold", "silver"]},
        "trace": {"exists": True},
        "sku": {"prefix": "AB-"},
        "amount": {"range": {"gte": 10, "lt": 100}},
    }
    f = compile_filter(spec)
    good = {"region": "eu", "tier": "gold", "trace": "1", "sku": "AB-7", "amount": "10"}
    assert f.matches(good)
    for key, value in [("region", "us"), ("tier", "bronze"), ("sku", "XY"), ("amount", "100"), ("amount", "ten")]:
        assert not f.matches(good | {key: value})
    assert not f.matches({k: v for k, v in good.items() if k != "trace"})
    assert compile_filter({"gone": {"exists": False}}).matches({})
    assert compile_filter(None).matches({"anything": "x"})


@pytest.mark.parametrize(
    "bad",
    [
        {"h": {"bogus": 1}},
        {"h": {"in": []}},
        {"h": {"in": [1]}},
        {"h": {"eq": 5}},
        {"h": {"exists": "yes"}},
        {"h": {"range": {}}},
        {"h": {"range": {"gt": 5, "lt": 1}}},
        {"h": {"range": {"gt": 1, "gte": 1}}},
        {"h": {"range": {"gt": float("nan")}}},
        {"h": {"eq": "a", "prefix": "b"}},
        {"": "x"},
        ["not", "a", "dict"],
    ],
)
def test_bad_filters(bad):
    with pytest.raises(InvalidArgument):
        compile_filter(bad)


def test_token_bucket_paces_and_carries_fractions():
    bucket = TokenBucket(10, burst=5)
    assert bucket.take(100, 0.0) == 5
    assert bucket.take(100, 0.0) == 0
    assert bucket.next_ready(0.0) == pytest.approx(0.1)
    assert bucket.take(100, 0.25) == 2  # 2.5 tokens: 2 granted, half carried
    assert bucket.take(100, 0.3) == 1
    with pytest.raises(InvalidArgument):
        TokenBucket(0)


@given(st.lists(st.floats(0.0, 2.0), min_size=1, max_size=50), st.floats(0.5, 50), st.floats(1, 20))
def test_token_bucket_never_grants_more_than_burst_plus_rate(steps, rate, burst):
    bucket, now, granted = TokenBucket(rate, burst), 0.0, 0
    for step in steps:
        now += step
        granted += bucket.take(10_000, now)
    assert granted <= burst + rate * (now - steps[0]) + 1e-6  # the clock starts at the first take
    # under continuous demand each step refills min(burst, rate * step); whole tokens only: < 1 carried per step
    assert granted >= int(burst) + sum(min(burst, rate * step) - 1 for step in steps[1:]) - 1e-6

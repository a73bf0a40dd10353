"""Layered maps and sets equal the plain dict or set they stand for, and never change once built."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given
from hypothesis import strategies as st

from provenanced.core.layered import LayeredMap, LayeredSet, changed

KEYS = st.sampled_from([f"k{i}" for i in range(12)])
STEPS = st.lists(
    st.tuples(st.dictionaries(KEYS, st.integers(0, 3), max_size=4), st.lists(KEYS, max_size=4)),
    max_size=40,
)
# Enough distinct keys for a layer to outgrow its base and be folded into a new one.
MANY = st.integers(0, 150).map(str)
FOLDING = st.lists(
    st.tuples(st.dictionaries(MANY, st.integers(0, 3), max_size=12), st.lists(MANY, max_size=4)),
    max_size=30,
)


@given(st.dictionaries(KEYS, st.integers(0, 3)), STEPS)
def test_changed_maps_equal_the_dicts_they_stand_for(start: dict[str, int], steps: list) -> None:
    _check_against_dicts(start, steps)


@given(st.dictionaries(MANY, st.integers(0, 3)), FOLDING)
def test_maps_stay_equal_across_folds(start: dict[str, int], steps: list) -> None:
    _check_against_dicts(start, steps)


def _check_against_dicts(start: dict[str, int], steps: list) -> None:
    current = changed(MappingProxyType(dict(start)), {})
    model = dict(start)
    history = [(current, dict(model))]
    for updates, removed in steps:
        current = changed(current, updates, removed)
        for key in removed:
            if key not in updates:
                model.pop(key, None)
        model.update(updates)
        history.append((current, dict(model)))
    for built, expected in history:  # every earlier map still reads as it did when it was built
        assert dict(built) == expected
        assert len(built) == len(expected)
        assert sorted(built) == sorted(expected)
        for key in {*start, *(k for updates, removed in steps for k in (*updates, *removed))}:
            assert (key in built) == (key in expected)
            assert built.get(key) == expected.get(key)


def test_a_small_change_to_a_large_map_is_a_layer_over_it() -> None:
    base = MappingProxyType({f"k{i}": i for i in range(10_000)})
    after = changed(base, {"k1": -1, "new": 0}, ["k2"])
    assert isinstance(after, LayeredMap)
    assert after.base is base
    assert sorted(after.layer()) == [("k1", -1), ("k2", None), ("new", 0)]
    assert after["k1"] == -1 and "k2" not in after and after["new"] == 0 and len(after) == 10_000


def test_a_mutable_base_is_copied() -> None:
    mutable = {"a": 1}
    after = changed(mutable, {"b": 2})
    mutable["c"] = 3
    assert dict(after) == {"a": 1, "b": 2}


@given(st.sets(KEYS), st.lists(st.tuples(st.sets(KEYS), st.sets(KEYS)), max_size=30))
def test_changed_sets_equal_the_sets_they_stand_for(start: set[str], steps: list) -> None:
    current = LayeredSet.of(start)
    model = set(start)
    for added, removed in steps:
        current = current.changed(added, removed - added)
        model = (model | added) - (removed - added)
        assert set(current) == model
        assert len(current) == len(model)
        assert all(key in current for key in model)

"""Read-only maps and sets made from the previous one plus a few changes, in time that does not
grow with their size: a change to one unit must not copy the facts of ten thousand."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Set
from types import MappingProxyType
from typing import Any, TypeVar, cast

K = TypeVar("K")
V = TypeVar("V")

# A key removed from the base; the layer's own values are never this object.
_GONE: Any = object()
# Past this share of the base, a layer is folded into a new base: each fold copies the base
# once per that many changed keys, so a change costs O(1) amortised, and a lookup one extra probe.
_FOLD_SHARE = 8
_FOLD_MIN = 64


class LayeredMap(Mapping[K, V]):
    """``base`` with some keys replaced or removed; never mutated once built.

    Build the next one with ``changed``; ``base`` is always a plain read-only map, never another
    layer, so a lookup costs at most two dict probes.
    """

    __slots__ = ("_base", "_layer", "_len")

    def __init__(self, base: Mapping[K, V], layer: dict[K, V], length: int) -> None:
        self._base = base
        self._layer = layer  # key → new value, or _GONE
        self._len = length

    @property
    def base(self) -> Mapping[K, V]:
        """The read-only map this one changes."""
        return self._base

    def layer(self) -> Iterator[tuple[K, V | None]]:
        """Each key this map changes against ``base``: its value here, None when removed."""
        for key, value in self._layer.items():
            yield key, None if value is _GONE else value

    def __getitem__(self, key: K) -> V:
        value = self._layer.get(key, self)
        if value is self:
            return self._base[key]
        if value is _GONE:
            raise KeyError(key)
        return cast(V, value)

    def get(self, key: K, default: Any = None) -> Any:
        value = self._layer.get(key, self)
        if value is self:
            return self._base.get(key, default)
        return default if value is _GONE else value

    def __contains__(self, key: object) -> bool:
        value = self._layer.get(cast(K, key), self)
        return key in self._base if value is self else value is not _GONE

    def __iter__(self) -> Iterator[K]:
        layer = self._layer
        yield from (key for key in self._base if key not in layer)
        yield from (key for key, value in layer.items() if value is not _GONE)

    def __len__(self) -> int:
        return self._len


def changed(old: Mapping[K, V], updates: Mapping[K, V], removed: Iterable[K] = ()) -> Mapping[K, V]:
    """``old`` with ``updates`` set and ``removed`` gone, as a new read-only map; ``old`` stays.

    Costs the size of the changes (plus, now and then, one copy of the whole map). A base that
    is not a read-only view (a dict someone may still change) is copied at once.
    """
    if isinstance(old, LayeredMap):
        base: Mapping[K, V] = old.base
        layer = dict(old._layer)
        length = len(old)
    else:
        base, layer, length = old, {}, len(old)
    for key in removed:
        if key in updates:
            continue  # set again in the same change: the update wins
        present = layer[key] is not _GONE if key in layer else key in base
        if not present:
            continue
        length -= 1
        if key in base:
            layer[key] = cast(V, _GONE)
        else:
            del layer[key]
    for key, value in updates.items():
        present = (layer[key] is not _GONE) if key in layer else key in base
        length += 0 if present else 1
        layer[key] = value
    if len(layer) > max(_FOLD_MIN, len(base) // _FOLD_SHARE) or not isinstance(
        base, MappingProxyType
    ):
        folded = {k: v for k, v in base.items() if k not in layer}
        folded.update((k, v) for k, v in layer.items() if v is not _GONE)
        return MappingProxyType(folded)
    return LayeredMap(base, layer, length)


class LayeredSet(Set[K]):
    """A read-only set made like ``LayeredMap``: the keys of one."""

    __slots__ = ("_map",)

    def __init__(self, members: Mapping[K, None]) -> None:
        self._map = members

    @classmethod
    def of(cls, items: Iterable[K]) -> LayeredSet[K]:
        """A set of ``items``."""
        return cls(MappingProxyType(dict.fromkeys(items)))

    def changed(self, added: Iterable[K] = (), removed: Iterable[K] = ()) -> LayeredSet[K]:
        """This set with ``added`` in and ``removed`` out, as a new one; this one stays."""
        added = dict.fromkeys(added)
        if not added and not removed:
            return self
        return LayeredSet(changed(self._map, added, removed))

    @classmethod
    def _from_iterable(cls, items: Iterable[Any]) -> frozenset[Any]:
        # What ``|``, ``&`` and ``-`` build: a plain frozenset, not a layer.
        return frozenset(items)

    def __contains__(self, item: object) -> bool:
        return item in self._map

    def __iter__(self) -> Iterator[K]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

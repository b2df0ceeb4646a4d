"""A small least-recently-used cache of computed values (text features), keyed by any hashable key.

``functools.lru_cache`` wraps a function and keys on its arguments; the callers here key on state that is
not an argument (parameter versions, device, dtype) and compute through a closure, hence this class.
"""

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache:
    """``get(key, compute)`` returns the cached value or stores ``compute()``; beyond ``max_entries`` keys the
    least recently used entry goes."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = compute()
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

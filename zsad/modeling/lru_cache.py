"""A small, thread-safe least-recently-used cache of computed values (text features), keyed by any hashable key.

``functools.lru_cache`` wraps a function and keys on its arguments; the callers here key on state that is
not an argument (parameter versions, device, dtype) and compute through a closure, hence this class.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache:
    """``get(key, compute)`` returns the cached value or stores ``compute()``; beyond ``max_entries`` keys the
    least recently used entry goes.

    Safe to call from several threads (request threads and a warm-up thread): the entries are only touched under
    a lock, ``compute()`` runs outside it, and when two threads compute the same key at once both get the value that
    was stored first.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()
        with self._lock:
            value = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def __deepcopy__(self, memo) -> "LRUCache":
        # A copy starts empty (a lock cannot be copied; transformers' AutoModel deep-copies its keyword arguments,
        # e.g. a backbone passed as clip_model).
        return LRUCache(self.max_entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

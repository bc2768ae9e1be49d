"""Page allocator with reference counts, and a prefix cache keyed by hashes of full pages.

A page holds `page_size` consecutive tokens of one sequence's KV. A full page is named by a hash of
its tokens chained with its predecessor's hash, so equal hashes mean equal prefixes. Pages are shared
by reference count; a page whose count drops to zero keeps its cached content (evictable, least
recently used first) until a fresh page is needed.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

ROOT_HASH = b"pallaskit-prefix-root"


def page_hash(parent: bytes, tokens) -> bytes:
    """Hash of one full page of tokens following the prefix named by `parent`."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


def page_hashes(tokens, page_size: int, parent: bytes = ROOT_HASH, start_page: int = 0):
    """Chained hashes of the full pages of `tokens` from page `start_page` on (parent: the hash before it)."""
    out = []
    for p in range(start_page, len(tokens) // page_size):
        parent = page_hash(parent, tokens[p * page_size:(p + 1) * page_size])
        out.append(parent)
    return out


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.refcount = np.zeros(num_pages, np.int32)
        self._free = collections.deque(range(num_pages))  # pages holding nothing worth keeping
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, count 0
        self._page_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (empty ones plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return int(np.count_nonzero(self.refcount))

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    # ------------------------------------------------------------------ pages
    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages with count 1, or None (nothing taken) when fewer than n are available."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.popleft()
            else:
                p, _ = self._evictable.popitem(last=False)  # least recently used cached page
                del self._page_of[self._hash_of.pop(p)]
            self.refcount[p] = 1
            pages.append(p)
        return pages

    def release(self, pages) -> None:
        """Drop one reference to each page; the last pages of a sequence are evicted first."""
        for p in reversed(list(pages)):
            if self.refcount[p] <= 0:
                raise RuntimeError(f"page {p} released more often than taken")
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                if p in self._hash_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes) -> list[int]:
        """Take a reference to the cached pages of the longest cached prefix of `hashes`."""
        if not self.prefix_caching:
            return []
        pages = []
        for h in hashes:
            p = self._page_of.get(h)
            if p is None:
                break
            if self.refcount[p] == 0:
                del self._evictable[p]
            self.refcount[p] += 1
            pages.append(p)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """Record that `page` (now full and written) holds the prefix named by h."""
        if not self.prefix_caching or page in self._hash_of or h in self._page_of:
            return
        self._page_of[h] = page
        self._hash_of[page] = h

    def check(self) -> None:
        """Invariants (tests): every page is exactly one of in use, evictable, free."""
        used = set(np.flatnonzero(self.refcount).tolist())
        ev, fr = set(self._evictable), set(self._free)
        assert not (used & ev) and not (used & fr) and not (ev & fr), "a page in two states"
        assert len(used) + len(ev) + len(fr) == self.num_pages, "a page lost"
        assert ev <= set(self._hash_of), "an evictable page without a hash"
        assert all(self._page_of[h] == p for p, h in self._hash_of.items())

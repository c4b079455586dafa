"""Memory of the cache: ``python -m bench.rss DATABASE_URL COUNT`` prints JSON.

Starts a real server (App) over a database holding 10 % more than COUNT keys (the fixtures'
filler rows), with both caches bounded to COUNT entries, and reports its resident memory:
empty; with COUNT keys cached, each loaded the way a Verify cache miss loads it (the store's
lookup by digest, through the cache); and with the negative cache full as well. The extra
10 % of each kind then checks that both caches stay within their bounds.
"""

import gc
import hashlib
import json
import sys
from typing import Any

from apikeys_server.app import create_server
from apikeys_server.config import Settings
from apikeys_server.storage.cache import CachedKeyLookup
from bench import proc
from bench.fixtures import filler_digest


def measure(url: str, count: int) -> dict[str, Any]:
    settings = Settings(
        database_url=url,
        listen="127.0.0.1:0",
        cache_size=count,
        cache_ttl_seconds=3600.0,
        negative_cache_size=count,
        negative_cache_ttl_seconds=3600.0,
        last_used_flush_seconds=3600.0,
    )
    app = create_server(settings)
    app.start()
    try:
        cache = app.services.cache
        lookup = CachedKeyLookup(app.services.store, cache)
        gc.collect()
        empty = proc.rss_bytes()
        found = sum(lookup.find_by_digest(filler_digest(n)) is not None for n in range(count))
        gc.collect()
        positive = proc.rss_bytes()
        for number in range(count):
            cache.put(hashlib.sha256(b"unknown %d" % number).digest(), None, cache.generation)
        gc.collect()
        negative = proc.rss_bytes()
        sizes_full = cache.sizes()
        extra = max(1, count // 10)
        for number in range(count, count + extra):
            lookup.find_by_digest(filler_digest(number))
            cache.put(hashlib.sha256(b"unknown %d" % number).digest(), None, cache.generation)
        sizes_after = cache.sizes()
    finally:
        app.stop(0)
    return {
        "keys": count,
        "found": found,
        "bound": count,
        "rss_empty_bytes": empty,
        "rss_positive_full_bytes": positive,
        "rss_negative_full_bytes": negative,
        "positive_delta_bytes": positive - empty,
        "negative_delta_bytes": negative - positive,
        "sizes_full": list(sizes_full),
        "sizes_after_overflow": list(sizes_after),
        "within_bound": sizes_after[0] <= count and sizes_after[1] <= count,
    }


def main(argv: list[str]) -> int:
    json.dump(measure(argv[0], int(argv[1])), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Plan teacher calls, run them through the cache, and parse them into provenance-stamped rows."""

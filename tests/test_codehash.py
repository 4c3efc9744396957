"""The code hashes' disk cache: reused only while every source file keeps its size and mtime."""

from __future__ import annotations

import json

import pytest

from metalign import codehash


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache file location and cleared in-process caches."""
    monkeypatch.setattr(codehash, "CACHE", tmp_path / "codehash.json")
    for cached in (codehash._stamp, codehash._stored):
        cached.cache_clear()
    yield tmp_path / "codehash.json"
    for cached in (codehash._stamp, codehash._stored):
        cached.cache_clear()


def test_cached_hashes_equal_computed_ones_and_a_stale_stamp_is_ignored(fresh):
    computed = {c: codehash._compute(c) for c in ("train", "extract", "demo-world")}
    assert {c: codehash.code_hash(c) for c in computed} == computed
    stored = json.loads(fresh.read_text())
    assert stored["stamp"] == codehash._stamp() and stored["hashes"] == computed
    # a planted wrong value under another stamp is never returned
    fresh.write_text(json.dumps({"stamp": "other", "hashes": {"train": "0" * 16}}))
    codehash._stored.cache_clear()
    assert codehash.code_hash("train") == computed["train"]
    # under the current stamp the cache is trusted (what makes a no-op dry run skip every AST)
    fresh.write_text(json.dumps({"stamp": codehash._stamp(), "hashes": {"train": "f" * 16}}))
    codehash._stored.cache_clear()
    assert codehash.code_hash("train") == "f" * 16


def test_a_corrupt_cache_is_recomputed(fresh):
    fresh.write_text("{not json")
    assert codehash.code_hash("encode") == codehash._compute("encode")


def test_unknown_command_is_named(fresh):
    with pytest.raises(KeyError, match="unknown metalign command 'nope'"):
        codehash.code_hash("nope")

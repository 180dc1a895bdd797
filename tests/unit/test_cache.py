import pytest

from src.chat.cache import CachedReply, ResponseCache, cache_key
from src.params import GenerationParams

pytestmark = pytest.mark.unit

GREEDY = GenerationParams(do_sample=False)


def test_least_recently_used_entry_is_evicted():
    cache = ResponseCache(max_entries=2)
    keys = [cache_key("m", [i], GREEDY) for i in range(3)]
    cache.put(keys[0], CachedReply("a", 1, "stop"))
    cache.put(keys[1], CachedReply("b", 1, "stop"))
    assert cache.get(keys[0]).text == "a"  # now keys[1] is the least recently used
    cache.put(keys[2], CachedReply("c", 1, "stop"))
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]).text == "a" and cache.get(keys[2]).text == "c"
    assert (cache.hits, cache.misses) == (3, 1)


def test_key_covers_model_prompt_and_every_parameter_but_the_seed():
    base = cache_key("m", [1, 2], GREEDY)
    assert base == cache_key("m", [1, 2], GREEDY.updated(seed=5))
    assert base != cache_key("other", [1, 2], GREEDY)
    assert base != cache_key("m", [1, 3], GREEDY)
    assert base != cache_key("m", [1, 2], GREEDY.updated(max_new_tokens=3))
    assert base != cache_key("m", [1, 2], GREEDY.updated(stop=["x"]))
    assert base != cache_key("m", [1, 2], GREEDY.updated(repetition_penalty=1.5))


def test_size_zero_disables_the_cache():
    cache = ResponseCache(max_entries=0)
    key = cache_key("m", [1], GREEDY)
    cache.put(key, CachedReply("a", 1, "stop"))
    assert cache.get(key) is None and len(cache) == 0

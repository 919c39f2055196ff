"""distcifar/elastic.py in the pytest process, with real TCPStores: a restarted rank never takes the entry a dead
attempt left in the agent's store, whether its store is gone or its port now belongs to another store. The
restarts themselves, with real launchers, are in tests/launch/test_restarts.py."""

import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from distcifar import elastic

TIMEOUT = timedelta(seconds=20)


@pytest.fixture
def agent_store():
    """The elastic agent's store, which outlives every attempt."""
    return TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False)


def _attempt_store(token: str) -> TCPStore:
    store = TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    store.set(elastic.TOKEN_KEY, token)
    return store


def _publish_later(agent_store: TCPStore, store: TCPStore, token: str, delay_s: float) -> threading.Thread:
    """The new rank 0, slower to start than the rank looking for its store."""
    entry = f"127.0.0.1:{store.port}:{token}"
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), agent_store.set(elastic.ATTEMPT_STORE_KEY, entry)))
    thread.start()
    return thread


def test_an_entry_naming_a_store_that_is_gone_is_read_again_until_the_new_one(agent_store):
    dead = _attempt_store("dead-attempt")
    agent_store.set(elastic.ATTEMPT_STORE_KEY, f"127.0.0.1:{dead.port}:dead-attempt")
    del dead  # the dead attempt's rank 0 and its store are gone: its port refuses
    fresh = _attempt_store("this-attempt")
    publisher = _publish_later(agent_store, fresh, "this-attempt", delay_s=1.0)
    found = elastic._find_attempt_store(agent_store, 2, TIMEOUT)
    publisher.join()
    assert found.get(elastic.TOKEN_KEY) == b"this-attempt"
    found.set("written-by-rank-1", "x")
    assert fresh.get("written-by-rank-1") == b"x"  # the very store the new rank 0 serves


def test_an_entry_whose_port_another_store_holds_now_is_not_taken(agent_store):
    other = _attempt_store("someone-else")  # listens on the port the stale entry names
    agent_store.set(elastic.ATTEMPT_STORE_KEY, f"127.0.0.1:{other.port}:dead-attempt")
    fresh = _attempt_store("this-attempt")
    publisher = _publish_later(agent_store, fresh, "this-attempt", delay_s=1.0)
    found = elastic._find_attempt_store(agent_store, 2, TIMEOUT)
    publisher.join()
    assert found.get(elastic.TOKEN_KEY) == b"this-attempt"

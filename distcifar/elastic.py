"""In-job restarts under torch elastic (torchrun --max-restarts K, accelerate launch --max_restarts K): every
attempt of the worker group gets a process group of its own, which shares nothing with a dead attempt's.

Why: the elastic agent keeps ONE TCPStore for the whole job and hands its address (MASTER_ADDR:MASTER_PORT) to
the workers of every attempt (the c10d rendezvous shares its store with the workers since torch 2.5, the static
rendezvous that accelerate launch uses always did). A process group writes its bootstrap keys there: gloo each
rank's listening address, NCCL its unique id. A restarted group finds the dead group's keys still in the store,
and a rank that reads one before the new rank 0 has overwritten it connects to a process that is gone: gloo's
"Connection refused" / "connectFullMesh failed", or a hang inside ProcessGroupGloo's construction (pytorch#135712,
#167288): a race, so a restart fails only sometimes (docs/checkpoints.md has the trials).

What this does instead: the new rank 0 starts a TCPStore of its own on a free port, puts a random token in it
and publishes "address:port:token" in the agent's store. The other ranks read that entry and accept it only
when the store it names answers with the same token; an entry of a dead attempt names a store that is gone (or a
port some other store now holds, with another token), so they read it again until the new one is there. All
ranks then build the default process group on that store, and Accelerate finds it initialised.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import TCPStore

ATTEMPT_STORE_KEY = "distcifar/attempt_store"  # in the agent's store: where this attempt's own store is
TOKEN_KEY = "distcifar/token"  # in the attempt's store: proves it is the one the entry names
PROBE_TIMEOUT = timedelta(seconds=3)  # connecting to a store the entry names: a dead one refuses at once


def under_elastic_agent() -> bool:
    """Started by torch elastic's agent, whose store outlives each attempt's workers."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(backend: str, timeout: timedelta) -> None:
    """Initialise the default process group on a store of this attempt's own (see the module's docstring)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_host, agent_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = TCPStore(agent_host, agent_port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        host = _reachable_address(agent_host, agent_port)
        store = TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = secrets.token_hex(16)
        store.set(TOKEN_KEY, token)  # before the entry: whoever reads the entry finds the token
        agent_store.set(ATTEMPT_STORE_KEY, f"{host}:{store.port}:{token}")
    else:
        store = _find_attempt_store(agent_store, world_size, timeout)
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _find_attempt_store(agent_store: TCPStore, world_size: int, timeout: timedelta) -> TCPStore:
    """The store the new rank 0 published: an entry is read again until the store it names shows its token."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, port, token = agent_store.get(ATTEMPT_STORE_KEY).decode().rsplit(":", 2)
        try:
            store = TCPStore(host, int(port), world_size, is_master=False, timeout=PROBE_TIMEOUT)
            if store.get(TOKEN_KEY).decode() == token:
                return store
        except (RuntimeError, OSError):  # gone: an earlier attempt's entry (DistStoreError is a RuntimeError)
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no process group store of this attempt's rank 0 after {timeout.total_seconds():.0f} s "
                f"(last entry: {host}:{port})"
            )
        time.sleep(0.2)


def _reachable_address(agent_host: str, agent_port: int) -> str:
    """This host's address on the route to the agent's store: the other nodes reach the agent there, so they reach
    this host by it too (a UDP connect sends nothing; it only picks the route)."""
    family, kind, proto, _, address = socket.getaddrinfo(agent_host, agent_port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(address)
        return probe.getsockname()[0]

"""The hub seen through a proxy, each case in a fresh process (huggingface_hub reads HF_ENDPOINT and the proxy
variables once): a dead proxy fails at once with a cold cache and loads a cached dataset, and the hub is reached
through the proxy the environment names. The in-process data tests are in tests/unit/test_data.py."""

import http.server
import json
import os
import sys
import threading

from distcifar.config import DataConfig
from distcifar.data import load_splits
from support import REPO, free_port, run

# The hub seen through a proxy, each case in a fresh process: huggingface_hub reads HF_ENDPOINT and the
# proxy variables once, when it is imported and when its HTTP client is made.
_LOAD_FROM_HUB = """
import json, sys, time
from distcifar.config import DataConfig
from distcifar.data import load_splits
from distcifar.errors import DataError
started = time.monotonic()
try:
    train, test, name = load_splits(DataConfig(name="uoft-cs/cifar10", cache_dir=sys.argv[1]))
except DataError as err:
    print(json.dumps({"error": str(err), "seconds": time.monotonic() - started}))
else:
    print(json.dumps({"train": train.labels.tolist(), "test": test.labels.tolist(), "first": train.images[0].tolist(),
                      "seconds": time.monotonic() - started}))
"""


def _hub_env(tmp_path, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper()
        not in (
            "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "HF_ENDPOINT",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
        )
    }
    return {**env, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO), **extra}


def _hf_datasets_cache(hf_home, parquet_folder) -> None:
    """What `datasets.load_dataset("uoft-cs/cifar10")` leaves behind online and reads back offline (datasets 5.x):
    the prepared Arrow files in HF_HOME/datasets/uoft-cs___cifar10/plain_text/0.0.0/<commit>/. Built here by the same
    parquet builder from the synthetic parquet; datasets refuses local data files for a builder named after a hub
    repository, so it is built under the repository's name and moved into the namespaced folder."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    root = hf_home / "datasets"
    builder = Parquet(
        cache_dir=str(root),
        dataset_name="cifar10",
        config_name="plain_text",
        config_id="plain_text",
        hash="0123456789abcdef0123456789abcdef01234567",
        data_files={split: str(parquet_folder / f"{split}.parquet") for split in ("train", "test")},
    )
    builder.download_and_prepare()
    (root / "cifar10").rename(root / "uoft-cs___cifar10")


def test_behind_a_dead_proxy_a_cold_cache_fails_at_once_and_a_cached_dataset_loads(tmp_path, synthetic_data):
    proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _hub_env(tmp_path, HTTPS_PROXY=proxy, HTTP_PROXY=proxy)
    command = [sys.executable, "-c", _LOAD_FROM_HUB, str(tmp_path / "decoded")]
    cold = json.loads(run(command, env=env).stdout.splitlines()[-1])
    assert "cannot be reached and it is not in the cache" in cold["error"] and "--data.path" in cold["error"], cold
    assert cold["seconds"] < 5, cold

    _hf_datasets_cache(tmp_path / "hf", synthetic_data)
    warm = json.loads(run(command, env=env).stdout.splitlines()[-1])
    local, local_test, _ = load_splits(DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path / "local")))
    assert warm["train"] == local.labels.tolist() and warm["test"] == local_test.labels.tolist(), warm.get("error")
    assert warm["first"] == local.images[0].tolist()
    assert warm["seconds"] < 10, warm


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself with 200, and notes the request line."""

    seen: list[str] = []
    status = 200

    def do_HEAD(self):
        self.seen.append(self.requestline)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


_PROBE = """
import json, os, sys
from huggingface_hub.utils import close_session
from distcifar.data import _hub_reachable
answers = []
for proxy, no_proxy in json.loads(sys.argv[1]):
    os.environ.update(HTTP_PROXY=proxy, NO_PROXY=no_proxy)
    close_session()  # huggingface_hub's client reads the proxy variables when it is made
    answers.append(_hub_reachable())
print(json.dumps(answers))
"""


def test_the_hub_is_reached_through_the_proxy_the_environment_names(tmp_path):
    # hub.invalid never resolves (RFC 6761): only a proxy can answer for it, as on a cluster whose nodes
    # have no direct route out. A raw connection to the endpoint's host would call the hub unreachable.
    # A proxy that answers 407 (credentials wanted) has not reached the hub: the download would fail there too.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    wants_credentials = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("_Wants", (_Proxy,), {"status": 407}))
    for each in (server, wants_credentials):
        threading.Thread(target=each.serve_forever, daemon=True).start()
    try:
        proxy, closed = f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{free_port()}"
        proxy_407 = f"http://127.0.0.1:{wants_credentials.server_address[1]}"
        # a live proxy, a dead one, NO_PROXY for the hub, a proxy that wants credentials
        cases = [(proxy, ""), (closed, ""), (proxy, "hub.invalid"), (proxy_407, "")]
        answers = run(
            [sys.executable, "-c", _PROBE, json.dumps(cases)], env=_hub_env(tmp_path, HF_ENDPOINT="http://hub.invalid")
        )
        assert json.loads(answers.stdout.splitlines()[-1]) == [True, False, False, False]
        assert _Proxy.seen == ["HEAD http://hub.invalid/ HTTP/1.1"] * 2  # the 407 proxy was asked too
    finally:
        server.shutdown()
        wants_credentials.shutdown()

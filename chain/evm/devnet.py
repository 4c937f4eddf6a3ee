"""Local EVM devnets behind one API: a managed anvil process, or the embedded py-evm chain.

Anvil is the real thing (JSON-RPC over HTTP, other processes can connect, state kept in a
file so a restart continues the same chain). The state file is written only through
:func:`dump_anvil_state` (``anvil_dumpState``, then a synced temp file renamed into place):
anvil's own periodic dump neither syncs nor renames, so a crash while it writes could leave
half a file. The finality committee dumps before it posts a certificate, which makes every
final block durable; ``stop()`` dumps once more on the way out. The embedded chain (eth-tester + py-evm) needs
nothing started and suits single-process use. Both expose the same deterministic, funded
accounts (anvil's default mnemonic), so a test or demo runs unchanged on either.
"""

from __future__ import annotations

import ast
import atexit
import bisect
import contextlib
import gzip
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import HTTPProvider, Web3

from prismesh.chain.evm.toolchain import repo_root

DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_HD_PATH = "m/44'/60'/0'/0"
DEFAULT_ACCOUNTS = 20
ANVIL_CHAIN_ID = 31337
EMBEDDED_CHAIN_ID = 131277
# Chain ids of the local devnets: their well-known dev keys may sign, nothing of value is at stake.
DEV_CHAIN_IDS = (ANVIL_CHAIN_ID, EMBEDDED_CHAIN_ID)
# Both chains run the same fork so a contract behaves identically on either.
HARDFORK = "prague"


class DevnetError(RuntimeError):
    """A devnet could not be started, reached or controlled."""


def _num(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def anvil_dump_inconsistency(dump: dict[str, Any]) -> str | None:
    """Why an ``anvil_dumpState`` answer is not one moment of the chain, or None when it is.

    anvil copies its blocks, its transactions and its accounts under separate locks, so a block
    mined while it dumps can leave the accounts ahead of the blocks. Loaded back, such a file
    keeps a transaction's effects (a commitment in contract storage) but not the transaction,
    its receipt or its logs, and the next block reuses the lost block's number."""
    blocks = dump.get("blocks") or []
    if not blocks:
        return "the dump holds no blocks"
    best = _num(dump["best_block_number"])
    numbers = sorted(_num(b["header"]["number"]) for b in blocks)
    if numbers[-1] != best or numbers != list(range(numbers[0], best + 1)):
        return f"its blocks {numbers[0]}..{numbers[-1]} do not end at its head {best} without a gap"
    in_blocks = {
        str(entry["transaction"]["hash"]).lower() for b in blocks for entry in b["transactions"]
    }
    transactions = dump.get("transactions") or []
    recorded = {str(t["info"]["transaction_hash"]).lower() for t in transactions}
    if in_blocks != recorded:
        return (f"{len(in_blocks - recorded)} transaction(s) of its blocks have no record and "
                f"{len(recorded - in_blocks)} record(s) belong to no block")
    sent: dict[str, int] = {}
    for t in transactions:
        sender = str(t["info"]["from"]).lower()
        sent[sender] = sent.get(sender, 0) + 1
    for address, account in (dump.get("accounts") or {}).items():
        if account.get("code", "0x") not in ("0x", "", None):
            continue  # contract nonces count creations, not transactions
        nonce, count = _num(account.get("nonce", 0)), sent.get(address.lower(), 0)
        if nonce != count:
            return (f"account {address} has nonce {nonce} but {count} transaction(s) in the "
                    "blocks: its state is ahead of (or behind) the blocks")
    return None


def request_anvil_dump(w3: Any) -> bytes:
    """anvil's whole state as ``anvil_dumpState`` answers it, as the plain JSON ``--load-state``
    reads (the RPC answers gzip)."""
    raw = bytes.fromhex(str(_anvil_rpc(w3, "anvil_dumpState")).removeprefix("0x"))
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _anvil_rpc(w3: Any, method: str, params: list[Any] | None = None) -> Any:
    resp = w3.provider.make_request(method, params or [])
    if "error" in resp:
        raise DevnetError(f"{method} failed: {resp['error']}")
    return resp.get("result")


@contextlib.contextmanager
def _mining_held(w3: Any) -> Any:
    """An automining anvil mines nothing meanwhile: transactions sent wait in its pool and are
    mined when automining resumes (at once). A no-op for an anvil that is not automining."""
    held = bool(_anvil_rpc(w3, "anvil_getAutomine"))
    if held:
        _anvil_rpc(w3, "evm_setAutomine", [False])
    try:
        yield
    finally:
        if held:
            _anvil_rpc(w3, "evm_setAutomine", [True])


def dump_anvil_state(w3: Any, path: Path, attempts: int = 20, unheld: int = 3) -> int:
    """Write anvil's whole state (accounts, every block, every transaction) to ``path``
    durably, in the format ``anvil --load-state`` reads; returns the height it holds.

    A dump taken while a block was mined can be torn (:func:`anvil_dump_inconsistency`), so it
    is taken again until it is whole; two identical dumps in a row are whole by definition
    (nothing moved between them), which keeps a state changed by hand from blocking finality.
    After ``unheld`` torn dumps in a row (blocks come faster than a dump is taken) mining is
    held while it is taken again, so a busy chain delays its transactions by a few dumps
    instead of leaving its blocks without a durable copy."""
    from prismesh.chain.localstate import atomic_write_bytes

    found = _whole_dump(w3, min(unheld, attempts))
    if isinstance(found, str) and attempts > unheld:
        with _mining_held(w3):
            found = _whole_dump(w3, attempts - unheld)
    if isinstance(found, str):
        raise DevnetError(f"anvil_dumpState gave {attempts} torn dumps in a row: {found}")
    text, dump = found
    atomic_write_bytes(Path(path), text)
    return _num(dump["best_block_number"])


def _whole_dump(w3: Any, tries: int) -> tuple[bytes, dict[str, Any]] | str:
    """A whole dump (its text and its parse) within ``tries`` requests, or why the last was
    torn. Two identical dumps in a row count as whole."""
    previous: bytes | None = None
    reason = "no dump requested"
    for attempt in range(tries):
        text = request_anvil_dump(w3)
        dump = json.loads(text)
        reason = anvil_dump_inconsistency(dump) or ""
        if not reason or text == previous:
            return text, dump
        previous = text
        time.sleep(min(0.01 * (attempt + 1), 0.1))
    return reason


class StateDumper:
    """What the committee calls before it posts a certificate: anvil's state on disk, so no
    final block is lost to a crash. Counts dumps and their time for the finality benchmark."""

    def __init__(self, w3: Any, path: Path) -> None:
        self.w3 = w3
        self.path = Path(path)
        self.count = 0
        self.seconds = 0.0

    def __call__(self, height: int) -> int:
        start = time.perf_counter()
        durable = dump_anvil_state(self.w3, self.path)
        self.seconds += time.perf_counter() - start
        self.count += 1
        if durable < height:
            raise DevnetError(f"anvil's head {durable} is below the height {height} to make durable")
        return durable


@lru_cache(maxsize=4)
def _dev_keys(count: int) -> tuple[bytes, ...]:
    Account.enable_unaudited_hdwallet_features()
    return tuple(
        bytes(Account.from_mnemonic(DEV_MNEMONIC, account_path=f"{DEV_HD_PATH}/{i}").key)
        for i in range(count)
    )


def dev_accounts(count: int = DEFAULT_ACCOUNTS) -> list[LocalAccount]:
    """The deterministic devnet accounts (anvil's default mnemonic, path m/44'/60'/0'/0/i)."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return [Account.from_key(k) for k in _dev_keys(count)]


class Devnet(ABC):
    """A running chain: ``w3``, funded ``accounts`` and test-control primitives."""

    kind: str
    w3: Web3
    chain_id: int
    rpc_url: str | None
    accounts: list[LocalAccount]

    @abstractmethod
    def mine(self, n: int = 1) -> None:
        """Mine ``n`` empty blocks."""

    @abstractmethod
    def increase_time(self, seconds: int) -> None:
        """Move the chain clock forward by ``seconds`` and mine a block at the new time."""

    @abstractmethod
    def snapshot(self) -> Any:
        """Record the chain state; returns an id for ``revert``."""

    @abstractmethod
    def revert(self, snapshot_id: Any) -> None:
        """Return to a state recorded by ``snapshot`` (the id is consumed)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the chain (idempotent)."""

    @property
    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    @property
    def timestamp(self) -> int:
        """Timestamp of the latest block."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def __enter__(self) -> Devnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.rpc_url or "in-process"
        return f"<{type(self).__name__} {self.kind} chain_id={self.chain_id} {where}>"


# --------------------------------------------------------------------------------- anvil


def find_anvil() -> Path:
    """The anvil binary: ``$PRISMESH_ANVIL``, the platform binary from ``@foundry-rs``, then
    ``node_modules/.bin/anvil``, then ``anvil`` on PATH."""
    env = os.environ.get("PRISMESH_ANVIL")
    if env:
        path = Path(env)
        if not path.is_file():
            raise DevnetError(f"PRISMESH_ANVIL={env} is not a file")
        return path
    root = repo_root() / "node_modules" / "@foundry-rs"
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = platform.system().lower()
    # The platform package runs anvil directly; the .bin launcher is a node script whose
    # child process would outlive a terminate() of the launcher.
    candidates = [root / f"anvil-{system}-{machine}" / "bin" / "anvil"]
    candidates += sorted(root.glob("anvil-*/bin/anvil"))
    candidates.append(repo_root() / "node_modules" / ".bin" / "anvil")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    which = shutil.which("anvil")
    if which:
        return Path(which)
    raise DevnetError("anvil not found: run `npm ci` (make setup) or set PRISMESH_ANVIL")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (checked before starting anvil, whose
    health check would otherwise be answered by the process already there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port in TIME_WAIT after a stopped anvil counts as free (anvil can
        # bind it), a port with a live listener does not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# web3's default middleware that PrisMesh's requests never need: ENS names (a devnet has no
# ENS), the chain-id validation of unsigned transactions and the gas and fee filling of
# ``eth_sendTransaction`` (every transaction here is signed locally with its gas, fees and
# chain id set). Each runs around every request and costs a local read a third of its time.
_UNUSED_MIDDLEWARE = ("ens_name_to_address", "validation", "gas_price_strategy", "gas_estimate")


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class _PooledPosts:
    """web3's HTTP posts to a devnet on this host over one urllib3 connection pool.

    ``requests`` looks up proxies and netrc in the environment on every call, which costs a
    local devnet read more than the node's own answer (about 1 ms of 1.4). A loopback
    endpoint has no proxy to find, so its posts skip ``requests`` and keep its errors:
    ``requests.ConnectionError`` for a refused or dropped connection, ``requests.Timeout`` for
    one that does not answer in time and ``requests.HTTPError`` for an HTTP error status, as
    web3's retries and :func:`prismesh.chain.localstate.network_message` expect."""

    def __init__(self, endpoint_uri: str) -> None:
        import urllib.parse

        import urllib3

        parts = urllib.parse.urlsplit(endpoint_uri)
        self.endpoint_uri = endpoint_uri
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.pool = urllib3.connection_from_url(endpoint_uri, maxsize=8)
        # As requests does: no retry of a request that may have reached the node.
        self.retries = urllib3.Retry(0, read=False, redirect=False)

    def post(self, data: bytes, headers: dict[str, str], timeout: float) -> bytes:
        import requests
        import urllib3

        try:
            response = self.pool.urlopen("POST", self.path, body=data, headers=headers, retries=self.retries,
                                         timeout=urllib3.Timeout(connect=timeout, read=timeout))
        except urllib3.exceptions.MaxRetryError as exc:
            timed_out = isinstance(exc.reason, urllib3.exceptions.TimeoutError)
            if timed_out and not isinstance(exc.reason, urllib3.exceptions.NewConnectionError):
                raise self._failure(requests.exceptions.Timeout, exc.reason) from exc
            raise self._failure(requests.exceptions.ConnectionError, exc.reason) from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise self._failure(requests.exceptions.Timeout, exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._failure(requests.exceptions.ConnectionError, exc) from exc
        if response.status >= 400:
            raise self._failure(requests.exceptions.HTTPError,
                                f"{response.status} {response.reason} for url: {self.endpoint_uri}")
        return response.data

    def _failure(self, kind: type[Exception], reason: Any) -> Exception:
        """requests' exception ``kind``, carrying a request with this endpoint's URL as its own do."""
        import requests

        return kind(reason, request=requests.Request("POST", self.endpoint_uri))


def _pooled_session_manager(endpoint_uri: str) -> Any:
    """web3's session manager with its posts to ``endpoint_uri`` made by :class:`_PooledPosts`."""
    from web3._utils.http_session_manager import HTTPSessionManager

    posts = _PooledPosts(endpoint_uri)

    class PooledSessionManager(HTTPSessionManager):
        def make_post_request(self, uri: Any, data: bytes | dict[str, Any], **kwargs: Any) -> bytes:
            if uri != posts.endpoint_uri or not isinstance(data, bytes) or kwargs.get("stream"):
                return super().make_post_request(uri, data, **kwargs)
            headers = kwargs.get("headers") or {"Content-Type": "application/json"}
            return posts.post(data, headers, float(kwargs.get("timeout") or 30.0))

    return PooledSessionManager()


def http_web3(rpc_url: str, timeout: float = 60.0) -> Web3:
    """A Web3 over HTTP that caches only eth_chainId/net_version (asked around many calls) and
    runs only the middleware its requests need (``_UNUSED_MIDDLEWARE``). A devnet on this host
    is reached over a kept-alive connection pool (:class:`_PooledPosts`)."""
    import urllib.parse

    from web3.types import RPCEndpoint

    provider = HTTPProvider(
        rpc_url,
        request_kwargs={"timeout": timeout},
        cache_allowed_requests=True,
        cacheable_requests={
            RPCEndpoint("eth_chainId"),
            RPCEndpoint("net_version"),
            RPCEndpoint("web3_clientVersion"),
        },
    )
    if urllib.parse.urlsplit(rpc_url).hostname in _LOOPBACK_HOSTS:
        provider._request_session_manager = _pooled_session_manager(rpc_url)
    w3 = Web3(provider)
    for name in _UNUSED_MIDDLEWARE:
        w3.middleware_onion.remove(name)
    return w3


def rpc_chain_id(rpc_url: str, timeout: float = 2.0) -> int | None:
    """``eth_chainId`` of the node at ``rpc_url`` by a direct request, or None if none answers."""
    import json
    import urllib.request

    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    req = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(json.loads(resp.read())["result"], 16)
    except Exception:
        return None


_LIVE: weakref.WeakSet[AnvilDevnet] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for dev in list(_LIVE):
        with contextlib.suppress(Exception):
            dev.stop()


class AnvilDevnet(Devnet):
    """A managed anvil process on 127.0.0.1; with ``state_file`` the chain survives restarts:
    it is loaded when it exists, and written by :meth:`dump_state` (the committee's dumps and
    ``stop()``), never by anvil itself."""

    kind = "anvil"

    def __init__(
        self,
        state_file: Path | None = None,
        port: int | None = None,
        chain_id: int = ANVIL_CHAIN_ID,
        block_time: float | None = None,
        num_accounts: int = DEFAULT_ACCOUNTS,
        startup_timeout: float = 30.0,
    ) -> None:
        if block_time is not None and block_time <= 0:
            raise ValueError(f"block_time must be positive, got {block_time}")
        self.chain_id = chain_id
        self.state_file = Path(state_file).resolve() if state_file else None
        self.port = port or free_port()
        if not port_is_free(self.port):
            raise DevnetError(f"port {self.port} is already in use on 127.0.0.1")
        self.rpc_url = f"http://127.0.0.1:{self.port}"
        self.accounts = dev_accounts(num_accounts)
        self.binary = find_anvil()
        cmd = [
            str(self.binary),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--chain-id", str(chain_id),
            "--mnemonic", DEV_MNEMONIC,
            "--accounts", str(num_accounts),
            "--hardfork", HARDFORK,
        ]  # fmt: skip
        if block_time is not None:
            cmd += ["--block-time", str(block_time)]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            if self.state_file.exists():
                cmd += ["--load-state", str(self.state_file)]
        log_dir = self.state_file.parent if self.state_file else Path(tempfile.gettempdir())
        self.log_path = log_dir / f"anvil-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches only us, and stop() shuts anvil down
            # in order (SIGINT, so the state file is written).
            start_new_session=True,
        )
        _LIVE.add(self)
        self.w3 = http_web3(self.rpc_url)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                where = ""
                if self.state_file is not None and self.state_file.exists():
                    where = (f" (loading {self.state_file}; if that file is damaged, move it "
                             "aside or start afresh with --fresh)")
                raise DevnetError(
                    f"anvil exited with {self.proc.returncode} on port {self.port}{where}: "
                    f"{self._log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        raise DevnetError(f"anvil did not answer on {self.rpc_url} within {timeout}s")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        """True when the process runs and answers ``eth_chainId`` with the expected id (asked
        over a fresh request: ``w3`` caches the chain id)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        return rpc_chain_id(self.rpc_url) == self.chain_id

    def _rpc(self, method: str, params: list[Any]) -> Any:
        return _anvil_rpc(self.w3, method, params)

    def mine(self, n: int = 1) -> None:
        self._rpc("anvil_mine", [hex(n)])

    def dump_state(self) -> int:
        """Write the chain to ``state_file`` now (durably); returns a height it includes."""
        if self.state_file is None:
            raise DevnetError("this anvil has no state file")
        return dump_anvil_state(self.w3, self.state_file)

    def increase_time(self, seconds: int) -> None:
        self._rpc("evm_increaseTime", [int(seconds)])
        self._rpc("evm_mine", [])

    def snapshot(self) -> str:
        return str(self._rpc("evm_snapshot", []))

    def revert(self, snapshot_id: Any) -> None:
        if not self._rpc("evm_revert", [snapshot_id]):
            raise DevnetError(f"evm_revert({snapshot_id}) refused: unknown snapshot")

    def detach(self) -> int:
        """Leave anvil running after this process exits; returns its pid."""
        if self.proc is None:
            raise DevnetError("anvil is not running")
        pid = self.proc.pid
        self.proc = None
        self._log.close()
        _LIVE.discard(self)
        return pid

    def stop(self, timeout: float = 15.0) -> None:
        """Stop anvil, writing ``state_file`` first; SIGINT, then SIGKILL if it hangs."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None and self.state_file is not None:
            with contextlib.suppress(Exception):
                self.dump_state()
        self.proc = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        _LIVE.discard(self)


def start_anvil(
    state_file: Path | None = None,
    port: int | None = None,
    chain_id: int = ANVIL_CHAIN_ID,
    block_time: float | None = None,
    num_accounts: int = DEFAULT_ACCOUNTS,
) -> AnvilDevnet:
    """Start anvil and wait until it answers. With ``state_file`` the chain is loaded from it
    (when it exists) and dumped to it on ``stop()`` and by the committee before each
    certificate, so a restart continues the same chain with every final block.
    Without ``port`` a free one is picked (retrying on a lost race)."""
    attempts = 1 if port is not None else 3
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return AnvilDevnet(
                state_file=state_file, port=port, chain_id=chain_id, block_time=block_time,
                num_accounts=num_accounts,
            )
        except DevnetError as exc:
            last = exc
    assert last is not None
    raise last


# ------------------------------------------------------------------------------ embedded


class EmbeddedDevnet(Devnet):
    """The in-process chain (eth-tester + py-evm); nothing to start, gone with the process."""

    kind = "embedded"

    def __init__(
        self, chain_id: int = EMBEDDED_CHAIN_ID, num_accounts: int = DEFAULT_ACCOUNTS
    ) -> None:
        from eth.chains.base import ChainContext
        from eth_tester import EthereumTester, PyEVMBackend
        from web3.providers.eth_tester import EthereumTesterProvider
        from web3.providers.eth_tester.defaults import API_ENDPOINTS, static_return

        self.chain_id = chain_id
        self.rpc_url = None
        self.accounts = dev_accounts(num_accounts)
        backend = PyEVMBackend.from_mnemonic(
            DEV_MNEMONIC, num_accounts=num_accounts, hd_path=DEV_HD_PATH
        )
        # eth-tester hard-codes its chain id; the chain class is built per backend, so
        # setting it here affects this chain only (and the genesis rebuild on revert).
        type(backend.chain).chain_id = chain_id
        backend.chain.chain_context = ChainContext(chain_id)
        self.tester = EthereumTester(backend)
        _look_up_transactions_by_index()
        endpoints = {ns: dict(methods) for ns, methods in API_ENDPOINTS.items()}
        endpoints["eth"]["chainId"] = static_return(chain_id)
        endpoints["net"]["version"] = static_return(str(chain_id))
        for name in ("call", "estimateGas"):
            endpoints["eth"][name] = _raw_revert_data(endpoints["eth"][name])
        self.log_index = LogIndex(self.tester)
        endpoints["eth"]["getLogs"] = lambda _tester, params: self.log_index.get_logs(**params[0])
        self.w3 = Web3(EthereumTesterProvider(self.tester, api_endpoints=endpoints))
        expected = {a.address for a in self.accounts}
        if not expected <= set(self.tester.get_accounts()):
            raise DevnetError("embedded chain accounts do not match the devnet mnemonic")

    def mine(self, n: int = 1) -> None:
        self.tester.mine_blocks(n)

    def increase_time(self, seconds: int) -> None:
        # eth-tester stamps the mined block one second before the target it is given.
        self.tester.time_travel(self.timestamp + int(seconds) + 1)

    def snapshot(self) -> int:
        return int(self.tester.take_snapshot())

    def revert(self, snapshot_id: Any) -> None:
        self.tester.revert_to_snapshot(snapshot_id)

    def stop(self) -> None:
        """Nothing runs outside the process; kept for the common API."""


class LogIndex:
    """The embedded chain's logs indexed by address and first topic, kept up to date from the
    chain's head: a log query costs the logs it returns plus the blocks mined since the last
    query, not the length of the range it names (eth-tester reads every block of the range and
    every receipt in them). ``blocks_read`` counts the blocks read into the index; a revert to
    a snapshot is noticed by the hash of the last block indexed and rebuilds the index."""

    def __init__(self, tester: Any) -> None:
        self.tester = tester
        self.blocks_read = 0
        self._reset()

    def _reset(self) -> None:
        self._hashes: list[Any] = []  # hash of each indexed block, by number
        self._by_address: dict[str, list[tuple[int, dict]]] = {}
        self._by_topic: dict[tuple[str, str], list[tuple[int, dict]]] = {}

    def _sync(self) -> int:
        head = int(self.tester.get_block_by_number("latest")["number"])
        if self._hashes:
            last = len(self._hashes) - 1
            if last > head or self.tester.get_block_by_number(last)["hash"] != self._hashes[-1]:
                self._reset()
        for number in range(len(self._hashes), head + 1):
            block = self.tester.get_block_by_number(number)
            self.blocks_read += 1
            for tx_hash in block["transactions"]:
                for entry in self.tester.get_transaction_receipt(tx_hash)["logs"]:
                    entry = dict(entry)
                    address = str(entry["address"]).lower()
                    self._by_address.setdefault(address, []).append((number, entry))
                    if entry["topics"]:
                        key = (address, _hex(entry["topics"][0]))
                        self._by_topic.setdefault(key, []).append((number, entry))
            self._hashes.append(block["hash"])
        return head

    def get_logs(self, from_block: Any = None, to_block: Any = None, address: Any = None,
                 topics: Any = None) -> list[dict]:
        """``eth_getLogs`` over the index, with eth-tester's answer for the same filter."""
        head = self._sync()
        low = _block_number(from_block, head)
        high = _block_number(to_block, head)
        if address is None:
            addresses = sorted(self._by_address)
        else:
            addresses = [str(a).lower() for a in (address if isinstance(address, (list, tuple)) else [address])]
        topics = list(topics or [])
        first = topics[0] if topics else None
        found: list[tuple[int, int, dict]] = []
        for addr in addresses:
            if first is None:
                lists = [self._by_address.get(addr, [])]
            else:
                wanted = first if isinstance(first, (list, tuple)) else [first]
                lists = [self._by_topic.get((addr, _hex(t)), []) for t in wanted]
            for entries in lists:
                start = bisect.bisect_left(entries, low, key=lambda e: e[0])
                for number, entry in entries[start:]:
                    if number > high:
                        break
                    if _topics_match(entry["topics"], topics):
                        found.append((number, int(entry["log_index"]), entry))
        found.sort(key=lambda f: (f[0], f[1]))
        return [entry for _, _, entry in found]


def _hex(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return str(value).lower()


def _block_number(value: Any, head: int) -> int:
    if value is None or value in ("latest", "pending", "safe", "finalized"):
        return head
    if value == "earliest":
        return 0
    return int(value, 16) if isinstance(value, str) else int(value)


def _topics_match(have: Any, want: list) -> bool:
    if len(want) > len(have):
        return False
    for got, expected in zip(have, want, strict=False):
        if expected is None:
            continue
        options = expected if isinstance(expected, (list, tuple)) else [expected]
        if _hex(got) not in {_hex(o) for o in options}:
            return False
    return True


def _look_up_transactions_by_index() -> None:
    """Find a mined transaction through py-evm's hash index instead of eth-tester's scan of
    every block from the head down: receipts, and ``eth_getLogs`` (a receipt per transaction of
    each block in range), then cost the same on a long chain as on a short one."""
    from eth.exceptions import TransactionNotFound
    from eth_tester.backends.pyevm import main as pyevm_main

    scan = pyevm_main._get_transaction_by_hash
    if getattr(scan, "indexed", False):
        return

    def lookup(chain: Any, transaction_hash: bytes) -> Any:
        try:
            number, index = chain.chaindb.get_transaction_index(transaction_hash)
        except TransactionNotFound:
            return scan(chain, transaction_hash)  # pending, or not there: eth-tester's answer
        if number >= chain.get_block().number:
            return scan(chain, transaction_hash)
        block = chain.get_canonical_block_by_number(number)
        if index >= len(block.transactions) or block.transactions[index].hash != transaction_hash:
            return scan(chain, transaction_hash)  # an index entry a revert left behind
        return block, block.transactions[index], index

    lookup.indexed = True  # type: ignore[attr-defined]
    pyevm_main._get_transaction_by_hash = lookup


def _raw_revert_data(endpoint: Any) -> Any:
    """Wrap an eth-tester endpoint so a revert carries its raw data as 0x-hex: web3's tester
    provider otherwise tries to read custom-error data as an Error(string) reason."""
    from eth_tester.exceptions import TransactionFailed

    def wrapper(tester: Any, params: Any) -> Any:
        try:
            return endpoint(tester, params)
        except TransactionFailed as exc:
            arg: Any = exc.args[0] if exc.args else b""
            if isinstance(arg, Exception):
                arg = arg.args[0] if arg.args else b""
            if isinstance(arg, str) and arg[:2] in ("b'", 'b"'):
                # eth_call reports the revert data as the repr of a bytes object.
                try:
                    arg = ast.literal_eval(arg)
                except (ValueError, SyntaxError):
                    raise exc from None
            if isinstance(arg, (bytes, bytearray)):
                raise TransactionFailed("0x" + bytes(arg).hex()) from exc
            raise

    return wrapper


def start_embedded(chain_id: int = EMBEDDED_CHAIN_ID) -> EmbeddedDevnet:
    """Create the in-process chain with the devnet accounts funded."""
    return EmbeddedDevnet(chain_id=chain_id)

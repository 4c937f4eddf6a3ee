"""Validator keys, the on-chain commit certificate, and the FinalityGadget's typed client.

What validators sign for the chain: ``commit_digest(chain_id, gadget, height, block_hash, view)``
= ``keccak256(abi.encode(COMMIT_TAG, chain_id, gadget, height, block_hash, view))``, the same
bytes as ``FinalityGadget.commitDigest``. An honest validator signs it only *after* its replica
committed, by the three-chain rule, the HotStuff node of view ``view`` whose payload is block
``(height, block_hash)`` (see :mod:`prismesh.chain.finality.committee`). A certificate therefore holds at least
``f + 1`` honest commits of that block, and HotStuff safety makes every such block lie on one chain.

Votes inside HotStuff use the same secp256k1 keys with plain (non-recoverable) DER ECDSA,
made and checked by libsecp256k1 (``coincurve``: about 0.05 ms a signature, against 0.7 ms
through OpenSSL); the recoverable signatures the contract's ``ecrecover`` needs are made only
once per certificate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_keys import keys as eth_keys
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address
from hexbytes import HexBytes
from web3.exceptions import MethodUnavailable

from prismesh.chain.evm.toolchain import REPO_ROOT

GADGET_SOURCE = REPO_ROOT / "contracts" / "FinalityGadget.sol"
COMMIT_TAG = keccak(b"PrisMesh.FinalityGadget.Commit.v1")
_ECDSA = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


# --------------------------------------------------------------------------- keys


class ValidatorKey:
    """One validator's secp256k1 key: HotStuff vote signatures and on-chain commit signatures."""

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32 or not 0 < int.from_bytes(private_key, "big") < _CURVE_ORDER:
            raise ValueError("a validator private key is 32 bytes in [1, n - 1] of secp256k1")
        self.private_key = private_key
        self._eth = eth_keys.PrivateKey(private_key)
        self._secp = coincurve.PrivateKey(private_key)
        self.public_key: bytes = self._eth.public_key.to_bytes()
        self.address: str = self._eth.public_key.to_checksum_address()

    def __repr__(self) -> str:
        return f"ValidatorKey({self.address})"

    def sign_vote(self, digest: bytes) -> bytes:
        """DER ECDSA signature (low s) over a 32-byte digest (HotStuff votes)."""
        if len(digest) != 32:
            raise ValueError(f"a vote digest is 32 bytes, got {len(digest)}")
        return self._secp.sign(digest, hasher=None)

    def sign_commit(self, digest: bytes) -> bytes:
        """65-byte ``r || s || v`` (v in {27, 28}, low s) signature for the gadget's ecrecover."""
        sig = self._eth.sign_msg_hash(digest)
        return sig.r.to_bytes(32, "big") + sig.s.to_bytes(32, "big") + bytes([sig.v + 27])


def generate_validator_keys(n: int = 4, seed: int | bytes | None = None) -> list[ValidatorKey]:
    """``n`` validator keys; deterministic for a given ``seed`` (devnets, tests), else random."""
    if n < 1 or (n - 1) % 3:
        raise ValueError(f"committee size must be n = 3f + 1 (1, 4, 7, ...), got {n}")
    if seed is None:
        return [ValidatorKey(_valid_scalar(secrets.token_bytes(32))) for _ in range(n)]
    base = seed if isinstance(seed, bytes) else str(seed).encode()
    return [
        ValidatorKey(_valid_scalar(keccak(b"PrisMesh.validator-key" + base + i.to_bytes(4, "big"))))
        for i in range(n)
    ]


def _valid_scalar(candidate: bytes) -> bytes:
    while not 0 < int.from_bytes(candidate, "big") < _CURVE_ORDER:
        candidate = keccak(candidate)
    return candidate


@functools.lru_cache(maxsize=1 << 16)
def verify_vote_signature(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """Check a vote signature against a 64-byte public key (results are memoized: pure).

    libsecp256k1 accepts only the low-s form of a signature, which every vote made here has; a
    high-s one (as OpenSSL makes half the time: votes signed before, or by another
    implementation) is checked by OpenSSL, so both forms of a valid signature count."""
    try:
        if coincurve.PublicKey(b"\x04" + public_key).verify(signature, digest, hasher=None):
            return True
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), b"\x04" + public_key)
        point.verify(signature, digest, _ECDSA)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def committee_domain(chain_id: int, gadget: str | None) -> bytes:
    """Domain of HotStuff votes: one committee per (chain, gadget) so votes cannot be replayed."""
    addr = bytes.fromhex(gadget[2:]) if gadget else b"\x00" * 20
    return keccak(b"PrisMesh.HotStuff.Committee.v1" + chain_id.to_bytes(32, "big") + addr)


# --------------------------------------------------------------------------- certificates


def commit_digest(chain_id: int, gadget: str, height: int, block_hash: bytes, view: int) -> bytes:
    """The message validators sign for the gadget (equal to ``FinalityGadget.commitDigest``)."""
    if len(block_hash) != 32:
        raise ValueError(f"block hash must be 32 bytes, got {len(block_hash)}")
    return keccak(
        abi_encode(
            ["bytes32", "uint256", "address", "uint256", "bytes32", "uint256"],
            [COMMIT_TAG, chain_id, to_checksum_address(gadget), height, block_hash, view],
        )
    )


@dataclass(frozen=True)
class CommitCertificate:
    """``2f + 1`` validators' signatures that block ``(height, block_hash)`` committed at ``view``."""

    height: int
    block_hash: bytes
    view: int
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]


def sign_certificate(
    keys: Iterable[ValidatorKey], chain_id: int, gadget: str, height: int, block_hash: bytes, view: int
) -> CommitCertificate:
    """Have each key sign the commit message and bundle the signatures (tests, tools)."""
    digest = commit_digest(chain_id, gadget, height, block_hash, view)
    keys = list(keys)
    return CommitCertificate(
        height,
        block_hash,
        view,
        tuple(k.address for k in keys),
        tuple(k.sign_commit(digest) for k in keys),
    )


# --------------------------------------------------------------------------- artifact


def gadget_artifact() -> dict[str, Any]:
    """``{"abi", "bytecode"}`` of FinalityGadget, compiled with solc-js and cached by source hash.

    The project toolchain (``prismesh.chain.evm.toolchain.compile_contracts``) builds the same contract for
    deployment; this standalone path compiles only this file so the gadget's tests and the
    committee do not depend on every other contract compiling.
    """
    source = GADGET_SOURCE.read_text()
    settings = {
        "evmVersion": "cancun",
        "optimizer": {"enabled": True, "runs": 200},
        "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
    }
    std_input = {
        "language": "Solidity",
        "sources": {"FinalityGadget.sol": {"content": source}},
        "settings": settings,
    }
    blob = json.dumps(std_input, sort_keys=True).encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    cache = REPO_ROOT / "build" / "finality" / f"FinalityGadget-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    solc_module = REPO_ROOT / "node_modules" / "solc"
    if not solc_module.exists():
        raise FileNotFoundError(f"solc-js not found at {solc_module}; run `npm ci` first")
    script = (
        f"const solc = require({json.dumps(str(solc_module))});"
        "const input = require('fs').readFileSync(0, 'utf8');"
        "process.stdout.write(solc.compile(input));"
    )
    proc = subprocess.run(
        ["node", "-e", script], input=blob, capture_output=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"solc-js failed: {proc.stderr.decode(errors='replace')[:2000]}")
    output = json.loads(proc.stdout)
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise RuntimeError("FinalityGadget.sol does not compile:\n" + "\n".join(
            e.get("formattedMessage", "") for e in errors))
    contract = output["contracts"]["FinalityGadget.sol"]["FinalityGadget"]
    artifact = {"abi": contract["abi"], "bytecode": "0x" + contract["evm"]["bytecode"]["object"]}
    _write_atomic(cache, json.dumps(artifact))
    return artifact


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- client


class GadgetRevert(Exception):
    """A FinalityGadget call reverted with the custom error ``error_name(*error_args)``."""

    def __init__(self, error_name: str, error_args: tuple[Any, ...]) -> None:
        super().__init__(f"{error_name}{error_args!r}")
        self.error_name = error_name
        self.error_args = error_args


def _error_table(abi: Sequence[dict[str, Any]]) -> dict[bytes, tuple[str, list[str]]]:
    table = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            table[function_signature_to_4byte_selector(sig)] = (item["name"], types)
    return table


def decode_revert(abi: Sequence[dict[str, Any]], data: bytes | str | None) -> GadgetRevert | None:
    """Turn revert data into a :class:`GadgetRevert` naming the custom error (None if unknown)."""
    if data is None:
        return None
    if isinstance(data, str):
        data = bytes.fromhex(data[2:] if data.startswith("0x") else data)
    entry = _error_table(abi).get(bytes(data[:4]))
    if entry is None:
        return None
    name, types = entry
    values = abi_decode(types, bytes(data[4:]))
    return GadgetRevert(
        name,
        tuple(to_checksum_address(v) if t == "address" else v for t, v in zip(types, values, strict=True)),
    )


def _revert_data(exc: BaseException) -> str | bytes | None:
    data = getattr(exc, "data", None)
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str | bytes):
        return data
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, str) and arg.startswith("0x"):
            return arg
        if isinstance(arg, dict) and isinstance(arg.get("data"), str):
            return arg["data"]
    return None


def deploy_gadget(w3: Any, validators: Sequence[str], deployer: Any) -> str:
    """Deploy FinalityGadget for ``validators`` from ``deployer`` (a LocalAccount); its address."""
    art = gadget_artifact()
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    tx = factory.constructor(list(validators)).build_transaction(
        {"from": deployer.address, "nonce": w3.eth.get_transaction_count(deployer.address)}
    )
    receipt = _send(w3, deployer, tx)
    return receipt["contractAddress"]


def _send(w3: Any, account: Any, tx: dict[str, Any]) -> Any:
    from prismesh.chain.evm.contracts import await_receipt

    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = await_receipt(w3, tx_hash, 60.0)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {tx_hash.hex()} reverted without data")
    return receipt


class FinalityGadgetClient:
    """Typed access to a deployed FinalityGadget."""

    def __init__(self, w3: Any, address: str, abi: Sequence[dict[str, Any]] | None = None) -> None:
        from prismesh.chain.evm.contracts import AbiFunction

        self.w3 = w3
        self.abi = list(abi) if abi is not None else gadget_artifact()["abi"]
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=self.abi)
        # The committee's hot path (a height read per step, a certificate per final block)
        # encodes directly; web3's contract machinery costs more than anvil's answer.
        self._height = AbiFunction.named(self.abi, "finalizedHeight")
        self._submit = AbiFunction.named(self.abi, "submitCertificate")

    def finalized_height(self) -> int:
        """The highest final block height (0 before the first certificate)."""
        return int(self._height.read(self.contract))

    def finalized(self) -> tuple[int, bytes, int]:
        """``(height, block_hash, view)`` of the latest certificate."""
        f = self.contract.functions
        return (
            int(f.finalizedHeight().call()),
            bytes(f.finalizedHash().call()),
            int(f.finalizedView().call()),
        )

    def validators(self) -> list[str]:
        return list(self.contract.functions.validators().call())

    def quorum(self) -> int:
        return int(self.contract.functions.quorum().call())

    def commit_digest(self, height: int, block_hash: bytes, view: int) -> bytes:
        return commit_digest(self.w3.eth.chain_id, self.address, height, block_hash, view)

    def submit_certificate(self, cert: CommitCertificate, sender: Any, gas: int | None = None) -> Any:
        """Send ``submitCertificate``; return the receipt or raise :class:`GadgetRevert`.

        Checked against the pending block: a certificate for the newest block is valid once
        mined into the next one, while at "latest" block.number would still equal its height.
        The gas estimate is that check (it reverts with the gadget's error); with ``gas`` given,
        or where the chain cannot estimate against "pending", a call is."""
        from prismesh.chain.evm.contracts import fee_fields

        data = self._submit.encode(
            (cert.height, bytes(cert.block_hash), cert.view, list(cert.signers), [bytes(s) for s in cert.signatures])
        )
        tx: dict[str, Any] = {"from": sender.address, "to": self.address, "data": HexBytes(data), "value": 0}
        try:
            if gas is None:
                try:
                    gas = self.w3.eth.estimate_gas(tx, "pending") * 5 // 4
                except MethodUnavailable:  # eth-tester: no estimate against "pending"
                    self.w3.eth.call(tx, "pending")
                    gas = 100_000 + 20_000 * len(cert.signatures)
            else:
                self.w3.eth.call(tx, "pending")
            tx.update(gas=gas, chainId=int(self.w3.eth.chain_id), **fee_fields(self.w3.eth.get_block("latest")),
                      nonce=self.w3.eth.get_transaction_count(sender.address, "pending"))
        except Exception as exc:  # web3 raises several types for reverts; decode what it carries
            decoded = decode_revert(self.abi, _revert_data(exc))
            if decoded is not None:
                raise decoded from exc
            raise
        return _send(self.w3, sender, tx)

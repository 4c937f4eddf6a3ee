"""FinalityGadget on a real anvil: certificates accepted, every bad one rejected by its error."""

from __future__ import annotations

import pytest
from eth_account import Account

from prismesh.chain.finality.gadget import (
    CommitCertificate,
    FinalityGadgetClient,
    GadgetRevert,
    ValidatorKey,
    commit_digest,
    deploy_gadget,
    sign_certificate,
)
from tests.conftest import ChainEnv


def _keys(env: ChainEnv) -> list[ValidatorKey]:
    return [ValidatorKey(bytes(a.key)) for a in env.validators]


def _gadget(env: ChainEnv) -> FinalityGadgetClient:
    assert env.manifest.finality_gadget is not None
    return FinalityGadgetClient(env.w3, env.manifest.finality_gadget)


def _block(env: ChainEnv, back: int = 1) -> tuple[int, bytes]:
    env.devnet.mine(2)
    height = env.w3.eth.block_number - back
    return height, bytes(env.w3.eth.get_block(height)["hash"])


def _cert(env: ChainEnv, signers: list[ValidatorKey], height: int, block_hash: bytes, view: int = 9):
    gadget = _gadget(env)
    return sign_certificate(signers, env.w3.eth.chain_id, gadget.address, height, block_hash, view)


def _expect(env: ChainEnv, cert: CommitCertificate, error: str) -> tuple:
    with pytest.raises(GadgetRevert) as info:
        _gadget(env).submit_certificate(cert, env.governance)
    assert info.value.error_name == error, info.value
    return info.value.error_args


def test_validator_set_and_digest_match_python(chain_env: ChainEnv) -> None:
    gadget = _gadget(chain_env)
    assert gadget.validators() == [a.address for a in chain_env.validators]
    assert gadget.quorum() == 3
    height, block_hash = _block(chain_env)
    onchain = gadget.contract.functions.commitDigest(height, block_hash, 5).call()
    assert bytes(onchain) == commit_digest(chain_env.w3.eth.chain_id, gadget.address, height, block_hash, 5)


def test_quorum_certificate_finalizes_and_emits(chain_env: ChainEnv) -> None:
    keys = _keys(chain_env)
    gadget = _gadget(chain_env)
    height, block_hash = _block(chain_env)
    receipt = gadget.submit_certificate(_cert(chain_env, keys[1:], height, block_hash, 7), chain_env.governance)
    assert gadget.finalized() == (height, block_hash, 7)
    logs = gadget.contract.events.BlockFinalized().process_receipt(receipt)
    assert len(logs) == 1
    assert logs[0]["args"]["height"] == height and logs[0]["args"]["viewNumber"] == 7
    assert logs[0]["args"]["previousHeight"] == 0
    # All four signatures are accepted too; heights only grow.
    h2, hash2 = _block(chain_env)
    gadget.submit_certificate(_cert(chain_env, keys, h2, hash2, 8), chain_env.governance)
    assert gadget.finalized_height() == h2
    assert _expect(chain_env, _cert(chain_env, keys[:3], height, block_hash, 7), "StaleHeight") == (
        height,
        h2,
    )
    assert _expect(chain_env, _cert(chain_env, keys[:3], h2, hash2, 8), "StaleHeight") == (h2, h2)


def test_rejects_too_few_signatures(chain_env: ChainEnv) -> None:
    height, block_hash = _block(chain_env)
    assert _expect(chain_env, _cert(chain_env, _keys(chain_env)[:2], height, block_hash), "TooFewSignatures") == (2, 3)


def test_rejects_duplicate_signer(chain_env: ChainEnv) -> None:
    keys = _keys(chain_env)
    height, block_hash = _block(chain_env)
    cert = _cert(chain_env, [keys[0], keys[1], keys[0]], height, block_hash)
    assert _expect(chain_env, cert, "DuplicateSigner") == (keys[0].address,)


def test_rejects_non_validator(chain_env: ChainEnv) -> None:
    keys = _keys(chain_env)
    outsider = ValidatorKey(bytes(chain_env.outsiders[0].key))
    height, block_hash = _block(chain_env)
    cert = _cert(chain_env, [keys[0], keys[1], outsider], height, block_hash)
    assert _expect(chain_env, cert, "NotValidator") == (outsider.address,)


def test_rejects_forged_signatures(chain_env: ChainEnv) -> None:
    keys = _keys(chain_env)
    height, block_hash = _block(chain_env)
    good = _cert(chain_env, keys[:3], height, block_hash, 9)
    # A validator's real signature, but over another view: it recovers to another address.
    other = _cert(chain_env, keys[:3], height, block_hash, 10)
    forged = CommitCertificate(height, block_hash, 9, good.signers, good.signatures[:2] + other.signatures[2:])
    index, claimed, recovered = _expect(chain_env, forged, "ForgedSignature")
    assert (index, claimed) == (2, keys[2].address) and recovered != keys[2].address
    # A signature made by an outsider but claimed for a validator.
    intruder = ValidatorKey(bytes(Account.create().key))
    stolen = _cert(chain_env, [intruder], height, block_hash, 9).signatures[0]
    cert = CommitCertificate(height, block_hash, 9, good.signers, good.signatures[:2] + (stolen,))
    assert _expect(chain_env, cert, "ForgedSignature")[2] == intruder.address
    # Signed for another chain id: domain separation makes it worthless here.
    digest = commit_digest(chain_env.w3.eth.chain_id + 1, _gadget(chain_env).address, height, block_hash, 9)
    cross = CommitCertificate(height, block_hash, 9, good.signers, tuple(k.sign_commit(digest) for k in keys[:3]))
    _expect(chain_env, cross, "ForgedSignature")
    # Malformed bytes and high-s signatures.
    short = CommitCertificate(height, block_hash, 9, good.signers, (b"\x01" * 64,) + good.signatures[1:])
    assert _expect(chain_env, short, "MalformedSignature") == (0,)
    sig = good.signatures[0]
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s_high = (n - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big")
    flipped = sig[:32] + s_high + bytes([55 - sig[64]])
    malleable = CommitCertificate(height, block_hash, 9, good.signers, (flipped,) + good.signatures[1:])
    assert _expect(chain_env, malleable, "MalformedSignature") == (0,)


def test_rejects_wrong_block_hash_and_future_heights(chain_env: ChainEnv) -> None:
    keys = _keys(chain_env)
    height, block_hash = _block(chain_env)
    wrong = b"\x42" * 32
    args = _expect(chain_env, _cert(chain_env, keys[:3], height, wrong), "BlockHashMismatch")
    assert args == (height, block_hash, wrong)
    future = chain_env.w3.eth.block_number + 5
    _expect(chain_env, _cert(chain_env, keys[:3], future, wrong), "FutureHeight")
    _expect(chain_env, _cert(chain_env, keys[:3], height, b"\x00" * 32), "ZeroBlockHash")
    cert = _cert(chain_env, keys[:3], height, block_hash)
    mismatch = CommitCertificate(height, block_hash, cert.view, cert.signers, cert.signatures[:2])
    assert _expect(chain_env, mismatch, "LengthMismatch") == (3, 2)


def test_constructor_checks_the_validator_set(chain_env: ChainEnv) -> None:
    from web3.exceptions import ContractLogicError

    accounts = [a.address for a in chain_env.outsiders]
    address = deploy_gadget(chain_env.w3, accounts[:1], chain_env.governance)  # n = 1, f = 0
    assert FinalityGadgetClient(chain_env.w3, address).quorum() == 1
    for bad in (accounts[:3], accounts[:2] + accounts[:2], []):
        with pytest.raises((ContractLogicError, RuntimeError, ValueError)):
            deploy_gadget(chain_env.w3, bad, chain_env.governance)


def test_refuses_a_certificate_older_than_blockhash_can_check(chain_env: ChainEnv) -> None:
    """A quorum-signed certificate for an invented hash more than 256 blocks back used to be
    accepted (blockhash returns zero there); now only checkable heights are final."""
    keys = _keys(chain_env)
    gadget = _gadget(chain_env)
    old, real = _block(chain_env)
    chain_env.devnet.mine(300)
    invented = b"\x13" * 32
    args = _expect(chain_env, _cert(chain_env, keys[:3], old, invented), "UncheckableHeight")
    assert args[0] == old and args[1] > old + 256
    # Even its real hash cannot be checked any more: still refused.
    _expect(chain_env, _cert(chain_env, keys[:3], old, real), "UncheckableHeight")
    assert gadget.finalized_height() < old
    recent, recent_hash = _block(chain_env)  # a recent block still finalizes, and everything below
    gadget.submit_certificate(_cert(chain_env, keys[:3], recent, recent_hash), chain_env.governance)
    assert gadget.finalized_height() == recent > old


def test_a_client_pointed_at_no_gadget_says_so(chain_env: ChainEnv) -> None:
    """The height read encodes its call directly; at an address without the gadget's code it
    still fails with web3's message naming the problem, not a decoding error."""
    from web3.exceptions import BadFunctionCallOutput

    assert _gadget(chain_env).finalized_height() >= 0
    with pytest.raises(BadFunctionCallOutput, match="contract deployed correctly"):
        FinalityGadgetClient(chain_env.w3, chain_env.outsiders[0].address).finalized_height()

"""Registry and RewardToken on a real anvil chain: every external function and revert path."""

from __future__ import annotations

import pickle

import pytest

from prismesh.chain.evm.contracts import (
    AGGREGATOR_ROLE,
    DEFAULT_ADMIN_ROLE,
    GOVERNANCE_ROLE,
    AccessControlBadConfirmation,
    AccessControlEnforcedDefaultAdminDelay,
    AccessControlEnforcedDefaultAdminRules,
    AccessControlInvalidDefaultAdmin,
    AccessControlUnauthorizedAccount,
    AlreadyRegistered,
    ClientRegistered,
    ClientStatus,
    ClientStatusChanged,
    ContractRevert,
    EmptyDescriptor,
    ERC20InsufficientAllowance,
    ERC20InsufficientBalance,
    ErrorDecoder,
    InvalidStatusTransition,
    NotMinter,
    NotRegistered,
    PanicRevert,
    RevertWithReason,
    RoleGranted,
    UnknownRevert,
)
from tests.conftest import DESCRIPTOR, ChainEnv, commit_reveal_all, onboard, open_task


def test_register_records_pending_client_and_emits(chain_env: ChainEnv) -> None:
    client = chain_env.clients[0]
    reg = chain_env.registry(client)
    before = reg.client_count()
    receipt = reg.register(DESCRIPTOR)
    (ev,) = reg.events_in(receipt, "ClientRegistered")
    assert isinstance(ev, ClientRegistered)
    assert ev.client == client.address and ev.descriptor_hash == DESCRIPTOR
    info = reg.get_client(client.address)
    assert info.status is ClientStatus.PENDING
    assert info.descriptor_hash == DESCRIPTOR
    assert info.registered_at == chain_env.devnet.timestamp
    assert reg.client_count() == before + 1
    assert not reg.is_approved(client.address)


def test_register_reverts(chain_env: ChainEnv) -> None:
    client = chain_env.clients[0]
    reg = chain_env.registry(client)
    with pytest.raises(EmptyDescriptor):
        reg.register(b"\x00" * 32)
    reg.register(DESCRIPTOR)
    with pytest.raises(AlreadyRegistered) as exc:
        reg.register(DESCRIPTOR)
    assert exc.value.args == {"client": client.address, "status": ClientStatus.PENDING}
    assert "AlreadyRegistered(client=" in str(exc.value) and "ClientStatus.PENDING" in str(
        exc.value
    )


def test_status_transitions_and_events(chain_env: ChainEnv) -> None:
    client = chain_env.clients[0].address
    gov = chain_env.registry()
    onboard(chain_env, [chain_env.clients[0]])
    assert gov.status_of(client) is ClientStatus.APPROVED and gov.is_approved(client)

    receipt = gov.suspend(client)
    (ev,) = gov.events_in(receipt, "ClientStatusChanged")
    assert isinstance(ev, ClientStatusChanged)
    assert (ev.previous, ev.current, ev.by) == (
        ClientStatus.APPROVED,
        ClientStatus.SUSPENDED,
        chain_env.governance.address,
    )
    with pytest.raises(InvalidStatusTransition) as exc:
        gov.suspend(client)
    assert exc.value.args["current"] is ClientStatus.SUSPENDED

    gov.approve(client)  # reinstate
    assert gov.status_of(client) is ClientStatus.APPROVED
    with pytest.raises(InvalidStatusTransition):
        gov.approve(client)

    gov.revoke(client)
    assert gov.status_of(client) is ClientStatus.REVOKED
    for action in (gov.approve, gov.suspend, gov.revoke):
        with pytest.raises(InvalidStatusTransition) as exc:
            action(client)
        assert exc.value.args["current"] is ClientStatus.REVOKED
    with pytest.raises(AlreadyRegistered):
        chain_env.registry(chain_env.clients[0]).register(DESCRIPTOR)


def test_governance_only_and_unknown_clients(chain_env: ChainEnv) -> None:
    stranger = chain_env.outsiders[0]
    target = chain_env.clients[0]
    chain_env.registry(target).register(DESCRIPTOR)
    as_stranger = chain_env.registry(stranger)
    for action in (as_stranger.approve, as_stranger.suspend, as_stranger.revoke):
        with pytest.raises(AccessControlUnauthorizedAccount) as exc:
            action(target.address)
        assert exc.value.args == {"account": stranger.address, "neededRole": GOVERNANCE_ROLE}
    for action in (
        chain_env.registry().approve,
        chain_env.registry().suspend,
        chain_env.registry().revoke,
    ):
        with pytest.raises(NotRegistered) as exc:
            action(stranger.address)
        assert exc.value.args == {"client": stranger.address}


def test_update_descriptor(chain_env: ChainEnv) -> None:
    client = chain_env.clients[0]
    reg = chain_env.registry(client)
    with pytest.raises(NotRegistered):
        reg.update_descriptor(DESCRIPTOR)
    reg.register(DESCRIPTOR)
    new = bytes.fromhex("22" * 32)
    receipt = reg.update_descriptor(new)
    assert reg.events_in(receipt, "DescriptorUpdated")[0].descriptor_hash == new
    assert reg.get_client(client.address).descriptor_hash == new
    with pytest.raises(EmptyDescriptor):
        reg.update_descriptor(b"\x00" * 32)
    chain_env.registry().revoke(client.address)
    with pytest.raises(InvalidStatusTransition):
        reg.update_descriptor(new)


def test_roles(chain_env: ChainEnv) -> None:
    gov = chain_env.registry()
    agg, other = chain_env.aggregator.address, chain_env.outsiders[0].address
    assert gov.governance_role() == GOVERNANCE_ROLE and gov.aggregator_role() == AGGREGATOR_ROLE
    assert gov.default_admin_role() == DEFAULT_ADMIN_ROLE
    assert gov.get_role_admin(AGGREGATOR_ROLE) == DEFAULT_ADMIN_ROLE
    assert gov.is_governance(chain_env.governance.address) and not gov.is_governance(other)
    assert gov.is_aggregator(agg) and not gov.is_aggregator(other)
    receipt = gov.add_aggregator(other)
    (ev,) = gov.events_in(receipt, "RoleGranted")
    assert isinstance(ev, RoleGranted) and ev.account == other and ev.role == AGGREGATOR_ROLE
    assert gov.has_role(AGGREGATOR_ROLE, other)
    gov.remove_aggregator(other)
    assert not gov.is_aggregator(other)
    with pytest.raises(AccessControlBadConfirmation):
        chain_env.registry(chain_env.aggregator).renounce_role(AGGREGATOR_ROLE, other)
    chain_env.registry(chain_env.aggregator).renounce_role(AGGREGATOR_ROLE, agg)
    assert not gov.is_aggregator(agg)
    with pytest.raises(AccessControlUnauthorizedAccount):
        chain_env.registry(chain_env.outsiders[1]).grant_role(AGGREGATOR_ROLE, other)
    assert gov.supports_interface(bytes.fromhex("7965db0b"))  # IAccessControl
    assert not gov.supports_interface(bytes.fromhex("ffffffff"))


def test_read_only_client_cannot_send(chain_env: ChainEnv) -> None:
    from prismesh.chain.evm.contracts import Registry

    ro = Registry.read_only(chain_env.manifest, chain_env.w3)
    assert ro.client_count() >= 0
    with pytest.raises(PermissionError, match="read-only"):
        ro.register(DESCRIPTOR)


def test_reward_token(chain_env: ChainEnv) -> None:
    env = chain_env
    a, b, c = env.clients[:3]
    token = env.token()
    assert (token.name(), token.symbol(), token.decimals()) == ("PrisMesh Reward", "PRSM", 18)
    assert token.minter() == env.manifest.address("Coordinator")
    # Nobody but the Coordinator mints: not governance, not a client.
    for who in (env.governance, a):
        with pytest.raises(NotMinter) as exc:
            token.with_sender(who).mint(who.address, 5)
        assert exc.value.args == {"account": who.address}
    # Tokens exist only as claimed rewards.
    task = open_task(env, [a, b], reward_per_update=50, aggregator_reward=0, reward_budget=300)
    commit_reveal_all(env, task, 1, [a, b])
    env.coordinator(env.aggregator).submit_aggregate(task, 1, "bafyagg", b"\x01" * 32, {a.address: 1, b.address: 1})
    receipt = env.coordinator(a).claim_rewards(task)
    (minted,) = token.events_in(receipt, "Transfer")
    assert (minted.from_, minted.to, minted.value) == ("0x" + "00" * 20, a.address, 50)
    assert token.total_supply() == 50
    token.with_sender(a).transfer(b.address, 30)
    assert (token.balance_of(a.address), token.balance_of(b.address)) == (20, 30)
    with pytest.raises(ERC20InsufficientBalance) as exc:
        token.with_sender(b).transfer(a.address, 31)
    assert exc.value.args == {"sender": b.address, "balance": 30, "needed": 31}
    token.with_sender(a).approve(c.address, 20)
    assert token.allowance(a.address, c.address) == 20
    with pytest.raises(ERC20InsufficientAllowance):
        token.with_sender(c).transfer_from(a.address, c.address, 21)
    token.with_sender(c).transfer_from(a.address, c.address, 20)
    assert token.balance_of(c.address) == 20 and token.allowance(a.address, c.address) == 0


def test_admin_moves_in_two_steps_after_the_delay(chain_env: ChainEnv) -> None:
    env = chain_env
    gov = env.registry()
    new = env.outsiders[0]
    assert gov.default_admin() == gov.owner() == env.governance.address
    delay = gov.default_admin_delay()
    assert delay == 2 * 24 * 3600
    # The admin role is never granted in one step, not even by the admin.
    with pytest.raises(AccessControlEnforcedDefaultAdminRules):
        gov.grant_role(DEFAULT_ADMIN_ROLE, new.address)
    with pytest.raises(AccessControlUnauthorizedAccount):
        env.registry(new).begin_default_admin_transfer(new.address)
    receipt = gov.begin_default_admin_transfer(new.address)
    (ev,) = gov.events_in(receipt, "DefaultAdminTransferScheduled")
    pending, schedule = gov.pending_default_admin()
    assert ev.new_admin == pending == new.address and ev.accept_schedule == schedule
    assert schedule == env.devnet.timestamp + delay
    with pytest.raises(AccessControlEnforcedDefaultAdminDelay):
        env.registry(new).accept_default_admin_transfer()
    with pytest.raises(AccessControlInvalidDefaultAdmin):
        env.registry(env.outsiders[1]).accept_default_admin_transfer()
    env.devnet.increase_time(delay + 1)
    env.devnet.mine()
    env.registry(new).accept_default_admin_transfer()
    assert gov.default_admin() == new.address and gov.has_role(DEFAULT_ADMIN_ROLE, new.address)
    assert not gov.has_role(DEFAULT_ADMIN_ROLE, env.governance.address)
    # The new admin appoints governance; the old account can no longer grant roles.
    env.registry(new).grant_role(GOVERNANCE_ROLE, new.address)
    env.registry(new).revoke_role(GOVERNANCE_ROLE, env.governance.address)
    assert gov.is_governance(new.address) and not gov.is_governance(env.governance.address)
    with pytest.raises(AccessControlUnauthorizedAccount):
        gov.grant_role(AGGREGATOR_ROLE, env.outsiders[2].address)


def test_error_decoder_builtin_errors() -> None:
    from eth_abi import encode
    from eth_utils import function_signature_to_4byte_selector as sel

    dec = ErrorDecoder()
    err = dec.decode(sel("Error(string)") + encode(["string"], ["nope"]), "X", "f")
    assert isinstance(err, RevertWithReason) and err.args == {"reason": "nope"}
    assert str(err) == "Error(reason='nope') in X.f"
    panic = dec.decode(sel("Panic(uint256)") + encode(["uint256"], [0x11]))
    assert (
        isinstance(panic, PanicRevert)
        and panic.args["meaning"] == "arithmetic overflow or underflow"
    )
    unknown = dec.decode("0xdeadbeef")
    assert isinstance(unknown, UnknownRevert) and unknown.args["data"] == "0xdeadbeef"
    clone = pickle.loads(pickle.dumps(panic))
    assert (
        isinstance(clone, ContractRevert) and clone.args == panic.args and str(clone) == str(panic)
    )


def test_encryption_keys_beside_identities(chain_env: ChainEnv) -> None:
    """Registered clients, aggregators and auditors publish and rotate their X25519 keys; an
    outsider or a revoked client cannot, and a zero key is refused."""
    from prismesh.chain.evm.contracts import (
        AUDITOR_ROLE,
        EmptyEncryptionKey,
        EncryptionKeySet,
        NotAnIdentity,
    )

    gov = chain_env.registry()
    client, outsider, auditor = chain_env.clients[0], chain_env.outsiders[0], chain_env.outsiders[1]
    key1, key2 = bytes(range(32)), bytes(range(1, 33))
    with pytest.raises(NotAnIdentity) as exc:
        chain_env.registry(client).set_encryption_key(key1)
    assert exc.value.args["account"] == client.address
    chain_env.registry(client).register(DESCRIPTOR)
    receipt = chain_env.registry(client).set_encryption_key(key1)
    (ev,) = gov.events_in(receipt, "EncryptionKeySet")
    assert isinstance(ev, EncryptionKeySet) and ev.account == client.address and ev.key == key1
    chain_env.registry(client).set_encryption_key(key2)
    assert gov.encryption_key_of(client.address) == key2
    with pytest.raises(EmptyEncryptionKey):
        chain_env.registry(client).set_encryption_key(b"\x00" * 32)
    # The aggregator holds its role from deployment; an auditor once governance appoints it.
    chain_env.registry(chain_env.aggregator).set_encryption_key(key1)
    assert gov.encryption_key_of(chain_env.aggregator.address) == key1
    with pytest.raises(NotAnIdentity):
        chain_env.registry(auditor).set_encryption_key(key1)
    assert not gov.is_auditor(auditor.address)
    gov.add_auditor(auditor.address)
    assert gov.is_auditor(auditor.address) and gov.has_role(AUDITOR_ROLE, auditor.address)
    assert gov.auditor_role() == AUDITOR_ROLE
    chain_env.registry(auditor).set_encryption_key(key2)
    assert gov.encryption_key_of(auditor.address) == key2
    assert gov.encryption_key_of(outsider.address) == b"\x00" * 32
    # Revocation is final: the key stays readable, but can no longer change.
    gov.revoke(client.address)
    with pytest.raises(NotAnIdentity):
        chain_env.registry(client).set_encryption_key(key1)

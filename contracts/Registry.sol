// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";

/// @title PrisMesh participant registry
/// @notice A client is its key pair: its address registers with the hash of an institution
///         descriptor, and governance approves, suspends or revokes it. Governance, aggregator
///         and auditor roles live here too, so every contract asks one place who may do what.
///
///         Beside each identity (a client, an aggregator or an auditor) sits the X25519 public
///         key that updates and aggregates are encrypted to: one 32-byte word, set and rotated
///         by its holder, every change an event.
///
///         Administration follows OpenZeppelin's default-admin rules: exactly one account holds
///         DEFAULT_ADMIN_ROLE (it grants and revokes the other roles), and it moves only in two
///         steps, beginDefaultAdminTransfer by the current admin and acceptDefaultAdminTransfer
///         by the new one once `defaultAdminDelay()` has passed, so a stolen or mistyped key
///         cannot take over at once. The admin may be a contract (a multisig).
contract Registry is AccessControlDefaultAdminRules {
    /// @notice Role that approves, suspends and revokes clients and creates tasks.
    bytes32 public constant GOVERNANCE_ROLE = keccak256("GOVERNANCE_ROLE");
    /// @notice Role that may submit aggregates and fail rounds on the Coordinator.
    bytes32 public constant AGGREGATOR_ROLE = keccak256("AGGREGATOR_ROLE");
    /// @notice Role of the auditors the consortium appoints (recipients of encrypted updates).
    bytes32 public constant AUDITOR_ROLE = keccak256("AUDITOR_ROLE");

    /// @notice Lifecycle of a client. Revoked is final: the address can never take part again.
    enum ClientStatus {
        None,
        Pending,
        Approved,
        Suspended,
        Revoked
    }

    /// @notice What the registry holds for one client.
    struct Client {
        ClientStatus status;
        uint64 registeredAt;
        uint64 updatedAt;
        bytes32 descriptorHash;
    }

    mapping(address => Client) private _clients;
    uint256 private _clientCount;
    mapping(address => bytes32) private _encryptionKeys;

    /// @notice A descriptor hash of zero was given.
    error EmptyDescriptor();
    /// @notice The address is already registered (in any status, revoked included).
    error AlreadyRegistered(address client, ClientStatus status);
    /// @notice The address never registered.
    error NotRegistered(address client);
    /// @notice The requested transition is not allowed from the client's current status.
    error InvalidStatusTransition(address client, ClientStatus current, ClientStatus requested);
    /// @notice An encryption key of zero was given.
    error EmptyEncryptionKey();
    /// @notice The caller is neither a registered, unrevoked client nor an aggregator or auditor.
    error NotAnIdentity(address account);

    /// @notice A new client registered and awaits approval.
    event ClientRegistered(address indexed client, bytes32 descriptorHash);
    /// @notice A client changed the hash of its institution descriptor.
    event DescriptorUpdated(address indexed client, bytes32 descriptorHash);
    /// @notice Governance moved a client to a new status.
    event ClientStatusChanged(
        address indexed client, ClientStatus previous, ClientStatus current, address indexed by
    );

    /// @notice An identity set (or rotated) the X25519 public key it receives encrypted data on.
    event EncryptionKeySet(address indexed account, bytes32 key);

    /// @param adminDelay Seconds between beginning and accepting an admin transfer.
    /// @param governance Account (an EOA or a multisig contract) that receives the admin and
    ///        governance roles; the deployer keeps no role unless it is this account.
    /// @param aggregators Accounts granted AGGREGATOR_ROLE from the start.
    constructor(uint48 adminDelay, address governance, address[] memory aggregators)
        AccessControlDefaultAdminRules(adminDelay, governance)
    {
        _grantRole(GOVERNANCE_ROLE, governance);
        for (uint256 i = 0; i < aggregators.length; ++i) {
            _grantRole(AGGREGATOR_ROLE, aggregators[i]);
        }
    }

    /// @notice Register the caller as a client with the hash of its institution descriptor.
    /// @param descriptorHash keccak256 of the canonical descriptor document (non-zero).
    function register(bytes32 descriptorHash) external {
        if (descriptorHash == bytes32(0)) revert EmptyDescriptor();
        Client storage c = _clients[msg.sender];
        if (c.status != ClientStatus.None) revert AlreadyRegistered(msg.sender, c.status);
        c.status = ClientStatus.Pending;
        c.registeredAt = uint64(block.timestamp);
        c.updatedAt = uint64(block.timestamp);
        c.descriptorHash = descriptorHash;
        _clientCount += 1;
        emit ClientRegistered(msg.sender, descriptorHash);
    }

    /// @notice Replace the caller's descriptor hash (pending, approved or suspended clients).
    /// @param descriptorHash The new non-zero descriptor hash.
    function updateDescriptor(bytes32 descriptorHash) external {
        if (descriptorHash == bytes32(0)) revert EmptyDescriptor();
        Client storage c = _clients[msg.sender];
        if (c.status == ClientStatus.None) revert NotRegistered(msg.sender);
        if (c.status == ClientStatus.Revoked) {
            revert InvalidStatusTransition(msg.sender, c.status, c.status);
        }
        c.descriptorHash = descriptorHash;
        c.updatedAt = uint64(block.timestamp);
        emit DescriptorUpdated(msg.sender, descriptorHash);
    }

    /// @notice Set or rotate the caller's X25519 public key (RFC 7748 encoding, 32 bytes).
    /// @dev Open to registered clients that are not revoked and to aggregator and auditor role
    ///      holders; the key is used only where a task names its holder as a recipient.
    /// @param key The raw X25519 public key (non-zero).
    function setEncryptionKey(bytes32 key) external {
        if (key == bytes32(0)) revert EmptyEncryptionKey();
        ClientStatus status = _clients[msg.sender].status;
        bool client = status != ClientStatus.None && status != ClientStatus.Revoked;
        if (!client && !hasRole(AGGREGATOR_ROLE, msg.sender) && !hasRole(AUDITOR_ROLE, msg.sender)) {
            revert NotAnIdentity(msg.sender);
        }
        _encryptionKeys[msg.sender] = key;
        emit EncryptionKeySet(msg.sender, key);
    }

    /// @notice Approve a pending client, or reinstate a suspended one.
    /// @param client The client's address.
    function approve(address client) external onlyRole(GOVERNANCE_ROLE) {
        _transition(client, ClientStatus.Approved);
    }

    /// @notice Suspend an approved client; it cannot join, commit or reveal until reinstated.
    /// @param client The client's address.
    function suspend(address client) external onlyRole(GOVERNANCE_ROLE) {
        _transition(client, ClientStatus.Suspended);
    }

    /// @notice Revoke a client for good (from pending, approved or suspended).
    /// @param client The client's address.
    function revoke(address client) external onlyRole(GOVERNANCE_ROLE) {
        _transition(client, ClientStatus.Revoked);
    }

    /// @notice The stored record of `client` (status None when it never registered).
    /// @param client The client's address.
    function getClient(address client) external view returns (Client memory) {
        return _clients[client];
    }

    /// @notice The status of `client`.
    /// @param client The client's address.
    function statusOf(address client) external view returns (ClientStatus) {
        return _clients[client].status;
    }

    /// @notice Whether `client` is approved (may join tasks, commit and reveal).
    /// @param client The client's address.
    function isApproved(address client) external view returns (bool) {
        return _clients[client].status == ClientStatus.Approved;
    }

    /// @notice Whether `account` holds the aggregator role.
    /// @param account The account to check.
    function isAggregator(address account) external view returns (bool) {
        return hasRole(AGGREGATOR_ROLE, account);
    }

    /// @notice Whether `account` holds the auditor role.
    /// @param account The account to check.
    function isAuditor(address account) external view returns (bool) {
        return hasRole(AUDITOR_ROLE, account);
    }

    /// @notice The X25519 public key `account` receives encrypted data on (zero: none set).
    /// @param account The account.
    function encryptionKeyOf(address account) external view returns (bytes32) {
        return _encryptionKeys[account];
    }

    /// @notice Whether `account` holds the governance role.
    /// @param account The account to check.
    function isGovernance(address account) external view returns (bool) {
        return hasRole(GOVERNANCE_ROLE, account);
    }

    /// @notice Number of addresses that ever registered.
    function clientCount() external view returns (uint256) {
        return _clientCount;
    }

    function _transition(address client, ClientStatus to) private {
        Client storage c = _clients[client];
        ClientStatus from = c.status;
        if (from == ClientStatus.None) revert NotRegistered(client);
        bool ok = false;
        if (to == ClientStatus.Approved) {
            ok = from == ClientStatus.Pending || from == ClientStatus.Suspended;
        } else if (to == ClientStatus.Suspended) {
            ok = from == ClientStatus.Approved;
        } else if (to == ClientStatus.Revoked) {
            ok = from != ClientStatus.Revoked;
        }
        if (!ok) revert InvalidStatusTransition(client, from, to);
        c.status = to;
        c.updatedAt = uint64(block.timestamp);
        emit ClientStatusChanged(client, from, to, msg.sender);
    }
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title PrisMesh reward token
/// @notice ERC-20 paid to clients whose updates are included in an accepted aggregate, and to
///         the aggregator. New tokens are only ever minted by holders of MINTER_ROLE (the
///         Coordinator), so the supply equals the sum of all rewards paid.
contract RewardToken is ERC20, AccessControl {
    /// @notice Role allowed to mint rewards (granted to the Coordinator at deployment).
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @notice Emitted for every mint, next to the ERC-20 Transfer from address(0).
    event RewardMinted(address indexed to, uint256 amount, address indexed minter);

    /// @param admin Account that may grant and revoke MINTER_ROLE.
    constructor(address admin) ERC20("PrisMesh Reward", "PRSM") {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Mint `amount` tokens to `to`.
    /// @dev Only MINTER_ROLE; reverts with AccessControlUnauthorizedAccount otherwise.
    /// @param to Recipient of the reward.
    /// @param amount Amount in the token's smallest unit.
    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        _mint(to, amount);
        emit RewardMinted(to, amount, msg.sender);
    }
}

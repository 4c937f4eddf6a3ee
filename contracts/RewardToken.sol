// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title PrisMesh reward token
/// @notice ERC-20 paid to clients for the contribution of their accepted updates and to
///         aggregators. Exactly one account can ever mint: `minter`, fixed at construction to
///         the Coordinator. There is no admin and no role to grant, so no key (governance
///         included) can mint outside the Coordinator's reward rules, and the supply is the sum
///         of the rewards the Coordinator paid out.
contract RewardToken is ERC20 {
    /// @notice The only account allowed to mint (the Coordinator), fixed forever.
    address public immutable minter;

    /// @notice The caller is not the minter.
    error NotMinter(address account);
    /// @notice The minter was the zero address.
    error ZeroMinter();

    /// @param minter_ The Coordinator's address. The deployment computes it before the
    ///        Coordinator exists; the Coordinator's constructor checks that it is the minter.
    constructor(address minter_) ERC20("PrisMesh Reward", "PRSM") {
        if (minter_ == address(0)) revert ZeroMinter();
        minter = minter_;
    }

    /// @notice Mint `amount` tokens to `to` (the ERC-20 Transfer from address(0) records it).
    /// @dev Only the minter; reverts with NotMinter otherwise.
    /// @param to Recipient of the reward.
    /// @param amount Amount in the token's smallest unit.
    function mint(address to, uint256 amount) external {
        if (msg.sender != minter) revert NotMinter(msg.sender);
        _mint(to, amount);
    }
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.28;

/// @title FinalityGadget
/// @notice Marks devnet block heights final on the strength of a HotStuff commit certificate:
///         at least 2f+1 of the n = 3f+1 validators sign, with their secp256k1 keys, a
///         domain-separated message (chain id, this contract, height, block hash, view). Honest
///         validators sign it only after committing the block by the three-chain rule, so a
///         certificate proves at least f+1 honest commits. A certificate for height h finalizes
///         every height <= h; heights only grow. The certified hash must be the chain's own
///         block hash, so only heights the EVM can still check (the last 256 blocks) are
///         accepted: an older certificate could name an invented hash.
/// @dev The validator set is fixed at construction (at most 256 validators, so that the
///      duplicate-signer check fits one bitmap word). Signatures are 65 bytes r || s || v with
///      low s and v in {27, 28}; they are checked with ecrecover against the claimed signer.
contract FinalityGadget {
    /// @notice Tag that separates commit messages from every other signed message.
    bytes32 public constant COMMIT_TAG = keccak256("PrisMesh.FinalityGadget.Commit.v1");
    uint256 private constant MAX_VALIDATORS = 256;
    uint256 private constant HALF_CURVE_ORDER =
        0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    address[] private _validators;
    /// @notice One plus the validator's index, zero for addresses outside the set.
    mapping(address => uint256) public validatorSlot;
    /// @notice Signatures a certificate needs: 2f + 1.
    uint256 public immutable quorum;
    /// @notice The highest final block height (0 until the first certificate).
    uint256 public finalizedHeight;
    /// @notice The hash of the block at `finalizedHeight`.
    bytes32 public finalizedHash;
    /// @notice The HotStuff view of the node that committed `finalizedHeight`.
    uint256 public finalizedView;

    /// @notice The validator set was fixed.
    event ValidatorSetInitialized(address[] validators, uint256 quorum);
    /// @notice Every height in (previousHeight, height] is final; `blockHash` is height's hash.
    event BlockFinalized(
        uint256 indexed height, bytes32 indexed blockHash, uint256 viewNumber, uint256 previousHeight, address submitter
    );

    error InvalidValidatorCount(uint256 count);
    error ZeroAddressValidator(uint256 index);
    error DuplicateValidator(address validator);
    error StaleHeight(uint256 height, uint256 finalizedHeight);
    error FutureHeight(uint256 height, uint256 currentBlock);
    error BlockHashMismatch(uint256 height, bytes32 expected, bytes32 given);
    error UncheckableHeight(uint256 height, uint256 currentBlock);
    error ZeroBlockHash();
    error LengthMismatch(uint256 signers, uint256 signatures);
    error TooFewSignatures(uint256 given, uint256 required);
    error NotValidator(address signer);
    error DuplicateSigner(address signer);
    error MalformedSignature(uint256 index);
    error ForgedSignature(uint256 index, address claimed, address recovered);

    /// @param validators_ The committee, n = 3f + 1 distinct non-zero addresses (n <= 256).
    constructor(address[] memory validators_) {
        uint256 n = validators_.length;
        if (n == 0 || n > MAX_VALIDATORS || n % 3 != 1) revert InvalidValidatorCount(n);
        for (uint256 i = 0; i < n; ++i) {
            address v = validators_[i];
            if (v == address(0)) revert ZeroAddressValidator(i);
            if (validatorSlot[v] != 0) revert DuplicateValidator(v);
            validatorSlot[v] = i + 1;
            _validators.push(v);
        }
        quorum = (2 * n + 1) / 3; // n = 3f + 1 gives exactly 2f + 1
        emit ValidatorSetInitialized(validators_, quorum);
    }

    /// @notice The validator addresses in index order.
    function validators() external view returns (address[] memory) {
        return _validators;
    }

    /// @notice Whether `account` is a validator.
    function isValidator(address account) external view returns (bool) {
        return validatorSlot[account] != 0;
    }

    /// @notice The digest validators sign for (height, blockHash, viewNumber) on this chain and contract.
    function commitDigest(uint256 height, bytes32 blockHash, uint256 viewNumber) public view returns (bytes32) {
        return keccak256(abi.encode(COMMIT_TAG, block.chainid, address(this), height, blockHash, viewNumber));
    }

    /// @notice Finalize `height` (and every lower height) with a commit certificate.
    /// @param height Block number being finalized; must exceed `finalizedHeight`, be mined and
    ///        be one of the last 256 blocks (older hashes cannot be checked on chain).
    /// @param blockHash Hash of that block; must equal `blockhash(height)`.
    /// @param viewNumber HotStuff view of the committing node, part of the signed message.
    /// @param signers Claimed signer of each signature (validators, each at most once).
    /// @param signatures 65-byte signatures over `commitDigest(height, blockHash, view)`.
    function submitCertificate(
        uint256 height,
        bytes32 blockHash,
        uint256 viewNumber,
        address[] calldata signers,
        bytes[] calldata signatures
    ) external {
        uint256 previous = finalizedHeight;
        if (height <= previous) revert StaleHeight(height, previous);
        if (height >= block.number) revert FutureHeight(height, block.number);
        if (blockHash == bytes32(0)) revert ZeroBlockHash();
        bytes32 onChain = blockhash(height);
        if (onChain == bytes32(0)) revert UncheckableHeight(height, block.number);
        if (onChain != blockHash) revert BlockHashMismatch(height, onChain, blockHash);
        uint256 count = signers.length;
        if (count != signatures.length) revert LengthMismatch(count, signatures.length);
        if (count < quorum) revert TooFewSignatures(count, quorum);

        bytes32 digest = commitDigest(height, blockHash, viewNumber);
        uint256 seen = 0;
        for (uint256 i = 0; i < count; ++i) {
            address claimed = signers[i];
            uint256 slot = validatorSlot[claimed];
            if (slot == 0) revert NotValidator(claimed);
            uint256 bit = 1 << (slot - 1);
            if (seen & bit != 0) revert DuplicateSigner(claimed);
            seen |= bit;
            address recovered = _recover(digest, signatures[i], i);
            if (recovered != claimed) revert ForgedSignature(i, claimed, recovered);
        }

        finalizedHeight = height;
        finalizedHash = blockHash;
        finalizedView = viewNumber;
        emit BlockFinalized(height, blockHash, viewNumber, previous, msg.sender);
    }

    function _recover(bytes32 digest, bytes calldata signature, uint256 index) private pure returns (address) {
        if (signature.length != 65) revert MalformedSignature(index);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        if ((v != 27 && v != 28) || uint256(s) > HALF_CURVE_ORDER) revert MalformedSignature(index);
        address recovered = ecrecover(digest, v, r, s);
        if (recovered == address(0)) revert MalformedSignature(index);
        return recovered;
    }
}

// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {Registry} from "./Registry.sol";
import {RewardToken} from "./RewardToken.sol";

/// @title PrisMesh federated-training coordinator
/// @notice Holds the training tasks and drives each round through
///         Open -> Commit -> Reveal -> Aggregating -> Finalized (or Failed).
///
///         Joining: approved clients call joinTask while the task is Created; governance then
///         calls startTask, which opens round 1 from the task's initial adapter.
///
///         Phases: a round is Open until its first commit and Commit after it. It moves to
///         Reveal when every participant has committed or the commit deadline passed, to
///         Aggregating when every committer has revealed or the reveal deadline passed, and an
///         Aggregating round may be failed by anyone once its aggregation deadline passed. The
///         time-driven moves are applied lazily: phaseOf() reports the effective phase and
///         every mutating call stores it (emitting PhaseChanged), so phases only move forward.
///         advancePhase lets anyone close a Commit or Reveal phase early when every participant
///         it still waits for is no longer approved, so a suspended client never holds a phase.
///         Every duration is bounded by MAX_PHASE_DURATION, so every round ends.
///
///         Commitment: keccak256(abi.encode(chainid, coordinator, taskId, round, sender, cid,
///         sha256, numSamples, salt)) with types (uint256, address, uint256, uint32, address,
///         string, bytes32, uint32, bytes32): a commitment is good for one sender, one round of
///         one task on one deployment, so it can be neither copied nor replayed.
///
///         Weights: a reveal may claim at most the task's sampleCap samples; the aggregator
///         weights updates by the claimed count (Weighting.Samples) or equally
///         (Weighting.Uniform), and the audit re-derives the weights from the chain.
///
///         Copies: a reveal whose content hash (sha256 of the adapter weights) equals the
///         round's global adapter or any update already revealed in the task is refused.
///
///         Rewards: an accepted round earns its included clients a pool of rewardPerUpdate per
///         included update, split in proportion to the contribution scores the aggregator
///         submits (anyone recomputes them from the chain and the stored adapters); the
///         aggregator earns aggregatorReward. Rewards accrue to each account and are minted
///         when it claims them; the total never exceeds the task's budget. State needed only
///         for history (CIDs, included lists, scores) lives in events, not in storage.
///
///         Participants per task are capped at MAX_PARTICIPANTS: every loop is bounded by it.
contract Coordinator {
    /// @notice Upper bound on participants per task (bounds every loop in this contract).
    uint8 public constant MAX_PARTICIPANTS = 32;
    /// @notice Fixed-point scale of metric values (0.734 is reported as 734000).
    int256 public constant METRIC_SCALE = 1e6;
    /// @notice Fixed-point scale of contribution scores (a score is in [0, SCORE_SCALE]).
    uint32 public constant SCORE_SCALE = 1e6;
    /// @notice Upper bound on each phase duration (commit, reveal, aggregation).
    uint32 public constant MAX_PHASE_DURATION = 30 days;

    /// @notice Lifecycle of a task.
    enum TaskStatus {
        None,
        Created,
        Running,
        Completed,
        Failed,
        Cancelled
    }

    /// @notice Phase of a round (ordered: a round's phase only increases).
    enum Phase {
        None,
        Open,
        Commit,
        Reveal,
        Aggregating,
        Finalized,
        Failed
    }

    /// @notice How the aggregate weights the included updates.
    enum Weighting {
        Samples,
        Uniform
    }

    /// @notice Where a participant's submission of one round stands.
    enum SubmissionStatus {
        None,
        Committed,
        Revealed,
        Accepted
    }

    /// @notice Parameters fixed when a task is created (field order packs the numbers).
    struct TaskParams {
        string baseModelId;
        bytes32 baseModelHash;
        string hyperParamsCid;
        string initialAdapterCid;
        bytes32 initialAdapterSha256;
        uint32 numRounds;
        uint32 maxFailedRounds;
        uint8 minParticipants;
        uint8 maxParticipants;
        Weighting weighting;
        uint32 sampleCap;
        uint32 commitDuration;
        uint32 revealDuration;
        uint32 aggregationDuration;
        uint128 rewardPerUpdate;
        uint128 aggregatorReward;
        uint256 rewardBudget;
    }

    /// @notice State of a task and of its current round (one storage slot for the round; the
    ///         rewards and the global adapter's CID hash share another, written once per round).
    struct TaskState {
        TaskStatus status;
        Phase phase;
        uint8 participantCount;
        uint8 commitCount;
        uint8 revealCount;
        uint32 currentRound;
        uint32 completedRounds;
        uint32 failedRounds;
        uint40 openedAt;
        uint128 rewardsPaid;
        bytes16 globalCidHash;
        bytes32 globalSha256;
        address creator;
    }

    /// @notice The current round's record of one participant, reused from round to round.
    struct Member {
        uint8 index;
        SubmissionStatus status;
        uint32 round;
        uint32 numSamples;
        uint128 owed;
        bytes32 commitment;
    }

    /// @notice The deadlines and counts of a round (counts only for the current round).
    struct RoundInfo {
        Phase phase;
        uint40 openedAt;
        uint40 commitDeadline;
        uint40 revealDeadline;
        uint40 aggregationDeadline;
        uint8 commitCount;
        uint8 revealCount;
    }

    /// @notice One participant's submission in a round.
    struct Submission {
        SubmissionStatus status;
        bytes32 commitment;
        uint32 numSamples;
    }

    struct Metric {
        bool reported;
        int256 value;
    }

    /// @notice Where clients, governance and aggregators are looked up.
    Registry public immutable registry;
    /// @notice The token minted as rewards; this contract is its only minter.
    RewardToken public immutable rewardToken;

    /// @dev Placeholder written at join so that each commit overwrites a non-zero slot.
    bytes32 private constant NO_COMMITMENT = bytes32(uint256(1));

    uint256 private _taskCount;
    mapping(uint256 => TaskParams) private _params;
    mapping(uint256 => TaskState) private _tasks;
    mapping(uint256 => address[]) private _participants;
    mapping(uint256 => mapping(address => Member)) private _members;
    /// @dev Content hash => round (1-based) in which it was revealed in the task.
    mapping(uint256 => mapping(bytes32 => uint32)) private _revealedIn;
    /// @dev One bit per failed round (round >> 8 selects the word).
    mapping(uint256 => mapping(uint256 => uint256)) private _failedRounds;
    mapping(address => uint256) private _feesOwed;
    mapping(uint256 => mapping(uint32 => mapping(address => mapping(bytes32 => Metric))))
        private _metrics;

    /// @notice The reward token's minter is not this contract.
    error TokenMinterMismatch(address minter);
    /// @notice The caller lacks the governance role.
    error NotGovernance(address account);
    /// @notice The caller lacks the aggregator role.
    error NotAggregator(address account);
    /// @notice The caller may not fail this round yet.
    error NotAuthorizedToFail(address account, uint40 aggregationDeadline);
    /// @notice A task parameter is out of range; `field` names it.
    error InvalidTaskParameter(string field);
    /// @notice No task with this id exists.
    error UnknownTask(uint256 taskId);
    /// @notice The task is not in the status the call needs.
    error WrongTaskStatus(uint256 taskId, TaskStatus expected, TaskStatus actual);
    /// @notice The client is not approved in the registry (its current status is given).
    error ClientNotApproved(address client, Registry.ClientStatus status);
    /// @notice The client already joined the task.
    error AlreadyParticipant(uint256 taskId, address client);
    /// @notice The task already has maxParticipants participants.
    error TaskFull(uint256 taskId, uint8 maxParticipants);
    /// @notice The client did not join the task.
    error NotParticipant(uint256 taskId, address client);
    /// @notice startTask needs at least minParticipants participants.
    error NotEnoughParticipants(uint256 taskId, uint8 have, uint8 need);
    /// @notice The round is not the task's current round.
    error UnknownRound(uint256 taskId, uint32 round, uint32 currentRound);
    /// @notice The round is not in the phase the call needs.
    error WrongPhase(uint256 taskId, uint32 round, Phase expected, Phase actual);
    /// @notice The commit deadline of the round has passed.
    error CommitDeadlinePassed(uint256 taskId, uint32 round, uint40 deadline);
    /// @notice The reveal deadline of the round has passed.
    error RevealDeadlinePassed(uint256 taskId, uint32 round, uint40 deadline);
    /// @notice An approved participant can still act in this phase, so it stays open.
    error PhaseStillOpen(uint256 taskId, uint32 round, address waitingFor);
    /// @notice The client already committed in this round.
    error AlreadyCommitted(uint256 taskId, uint32 round, address client);
    /// @notice The client already revealed in this round.
    error AlreadyRevealed(uint256 taskId, uint32 round, address client);
    /// @notice The client has no commitment in this round.
    error NotCommitted(uint256 taskId, uint32 round, address client);
    /// @notice The revealed values do not hash to the stored commitment.
    error CommitmentMismatch(uint256 taskId, uint32 round, address client, bytes32 expected, bytes32 actual);
    /// @notice A commitment of zero was given.
    error EmptyCommitment();
    /// @notice An empty CID was given.
    error EmptyCid();
    /// @notice A content hash of zero was given.
    error EmptyContentHash();
    /// @notice A reveal claimed zero training samples.
    error ZeroSamples();
    /// @notice A reveal claimed more samples than the task's cap.
    error SamplesAboveCap(uint256 taskId, uint32 numSamples, uint32 sampleCap);
    /// @notice The revealed update is the round's global adapter.
    error CopiedGlobal(uint256 taskId, uint32 round, bytes32 sha256);
    /// @notice The revealed update was already revealed in `revealedIn` of this task.
    error DuplicateUpdate(uint256 taskId, uint32 round, bytes32 sha256, uint32 revealedIn);
    /// @notice An included client did not reveal in this round.
    error NotRevealed(uint256 taskId, uint32 round, address client);
    /// @notice A client is listed twice in an aggregate.
    error DuplicateIncluded(uint256 taskId, uint32 round, address client);
    /// @notice The included clients are not in ascending address order.
    error UnsortedIncluded(uint256 taskId, uint32 round, uint256 index);
    /// @notice The included clients and their scores differ in number.
    error LengthMismatch(uint256 included, uint256 scores);
    /// @notice A contribution score above SCORE_SCALE.
    error ScoreOutOfRange(address client, uint32 score);
    /// @notice The aggregate includes fewer clients than the task's minimum.
    error TooFewIncluded(uint256 taskId, uint32 round, uint256 included, uint8 minimum);
    /// @notice The aggregate lists more clients than the task has participants.
    error TooManyIncluded(uint256 taskId, uint32 round, uint256 included, uint8 maximum);
    /// @notice failRound was given another CID than the round's global adapter.
    error WrongGlobalAdapter(uint256 taskId, string globalAdapterCid);
    /// @notice The caller has no rewards to claim.
    error NothingToClaim(address account);
    /// @notice An empty metric name, or one longer than 32 bytes.
    error InvalidMetricName();
    /// @notice The client already reported this metric for this round.
    error MetricAlreadyReported(uint256 taskId, uint32 round, address client, string metric);
    /// @notice A multicall with no calls.
    error EmptyBatch();
    /// @notice Call `index` of a multicall reverted without a reason (e.g. an unknown function).
    error BatchCallFailed(uint256 index);

    /// @notice A task was created (its full parameters are in `params`).
    event TaskCreated(uint256 indexed taskId, address indexed creator, TaskParams params);
    /// @notice An approved client joined a task.
    event ParticipantJoined(uint256 indexed taskId, address indexed client, uint8 participantCount);
    /// @notice Governance started a task; round 1 opens in the same transaction.
    event TaskStarted(uint256 indexed taskId, uint8 participantCount);
    /// @notice A round opened: train from `globalAdapterCid` ("" = from the base model).
    event RoundOpened(
        uint256 indexed taskId,
        uint32 indexed round,
        string globalAdapterCid,
        uint40 commitDeadline,
        uint40 revealDeadline,
        uint40 aggregationDeadline
    );
    /// @notice A round's stored phase moved forward.
    event PhaseChanged(uint256 indexed taskId, uint32 indexed round, Phase previous, Phase current);
    /// @notice A client committed to its update.
    event UpdateCommitted(
        uint256 indexed taskId, uint32 indexed round, address indexed client, bytes32 commitment
    );
    /// @notice A client revealed its update (matching its commitment).
    event UpdateRevealed(
        uint256 indexed taskId,
        uint32 indexed round,
        address indexed client,
        string cid,
        bytes32 sha256,
        uint32 numSamples
    );
    /// @notice An aggregate was accepted and the round finalized.
    event AggregateAccepted(
        uint256 indexed taskId,
        uint32 indexed round,
        address indexed aggregator,
        string aggregateCid,
        bytes32 aggregateSha256,
        address[] included
    );
    /// @notice A contributor (score of its update) or the aggregator earned a reward.
    event RewardEarned(
        uint256 indexed taskId,
        uint32 indexed round,
        address indexed recipient,
        uint32 score,
        uint256 amount,
        bool isAggregator
    );
    /// @notice A participant's earned rewards of a task were minted to it.
    event RewardsClaimed(uint256 indexed taskId, address indexed account, uint256 amount);
    /// @notice An aggregator's earned fees were minted to it.
    event FeesClaimed(address indexed aggregator, uint256 amount);
    /// @notice A round failed; a new attempt opens unless the task failed with it.
    event RoundFailed(uint256 indexed taskId, uint32 indexed round, string reason);
    /// @notice A participant reported a metric (value scaled by METRIC_SCALE).
    event MetricReported(
        uint256 indexed taskId, uint32 indexed round, address indexed client, string metric, int256 value
    );
    /// @notice All numRounds rounds were accepted.
    event TaskCompleted(uint256 indexed taskId, string finalAdapterCid);
    /// @notice More than maxFailedRounds rounds failed.
    event TaskFailed(uint256 indexed taskId, string reason);
    /// @notice Governance cancelled the task.
    event TaskCancelled(uint256 indexed taskId, string reason);

    /// @param registry_ The participant registry.
    /// @param rewardToken_ The reward token, deployed with this contract's address as minter.
    constructor(Registry registry_, RewardToken rewardToken_) {
        address minter = rewardToken_.minter();
        if (minter != address(this)) revert TokenMinterMismatch(minter);
        registry = registry_;
        rewardToken = rewardToken_;
    }

    modifier onlyGovernance() {
        if (!registry.isGovernance(msg.sender)) revert NotGovernance(msg.sender);
        _;
    }

    // ------------------------------------------------------------------ governance

    /// @notice Create a task; approved clients may then join it until startTask.
    /// @param p The task's parameters (see TaskParams).
    /// @return taskId The new task's id (ids start at 1).
    function createTask(TaskParams calldata p) external onlyGovernance returns (uint256 taskId) {
        _validate(p);
        taskId = ++_taskCount;
        _params[taskId] = p;
        TaskState storage t = _tasks[taskId];
        t.status = TaskStatus.Created;
        t.creator = msg.sender;
        t.globalSha256 = p.initialAdapterSha256;
        t.globalCidHash = bytes16(keccak256(bytes(p.initialAdapterCid)));
        emit TaskCreated(taskId, msg.sender, p);
    }

    /// @notice Start a task with its current participants and open round 1.
    /// @param taskId The task.
    function startTask(uint256 taskId) external onlyGovernance {
        TaskState storage t = _taskIn(taskId, TaskStatus.Created);
        uint8 need = _params[taskId].minParticipants;
        if (t.participantCount < need) revert NotEnoughParticipants(taskId, t.participantCount, need);
        t.status = TaskStatus.Running;
        emit TaskStarted(taskId, t.participantCount);
        _openRound(taskId, 1, _params[taskId].initialAdapterCid);
    }

    /// @notice Cancel a task that is not finished; an unfinished current round fails with it.
    /// @param taskId The task.
    /// @param reason Human-readable reason, recorded in the events.
    function cancelTask(uint256 taskId, string calldata reason) external onlyGovernance {
        TaskState storage t = _task(taskId);
        if (t.status != TaskStatus.Created && t.status != TaskStatus.Running) {
            revert WrongTaskStatus(taskId, TaskStatus.Running, t.status);
        }
        if (t.status == TaskStatus.Running) {
            uint32 round = t.currentRound;
            Phase from = _effectivePhase(t, _params[taskId]);
            if (from != Phase.Finalized && from != Phase.Failed) {
                t.phase = Phase.Failed;
                _failedRounds[taskId][round >> 8] |= 1 << (round & 0xff);
                emit PhaseChanged(taskId, round, from, Phase.Failed);
                emit RoundFailed(taskId, round, reason);
            }
        }
        t.status = TaskStatus.Cancelled;
        emit TaskCancelled(taskId, reason);
    }

    // ------------------------------------------------------------------ clients

    /// @notice Join a task that has not started yet (approved clients only).
    /// @param taskId The task.
    function joinTask(uint256 taskId) external {
        TaskState storage t = _taskIn(taskId, TaskStatus.Created);
        _requireApproved(msg.sender);
        Member storage m = _members[taskId][msg.sender];
        if (m.index != 0) revert AlreadyParticipant(taskId, msg.sender);
        uint8 cap = _params[taskId].maxParticipants;
        if (t.participantCount >= cap) revert TaskFull(taskId, cap);
        uint8 count = t.participantCount + 1;
        t.participantCount = count;
        m.index = count;
        m.commitment = NO_COMMITMENT;
        _participants[taskId].push(msg.sender);
        emit ParticipantJoined(taskId, msg.sender, count);
    }

    /// @notice Commit to an update for the current round (see the contract notes for the hash).
    /// @param taskId The task.
    /// @param round The current round.
    /// @param commitment The commitment (computeCommitment gives it).
    function commitUpdate(uint256 taskId, uint32 round, bytes32 commitment) external {
        TaskState storage t = _runningRound(taskId, round);
        Member storage m = _member(taskId, msg.sender);
        _requireApproved(msg.sender);
        if (m.round == round && m.status != SubmissionStatus.None) {
            revert AlreadyCommitted(taskId, round, msg.sender);
        }
        TaskParams storage p = _params[taskId];
        Phase phase = _effectivePhase(t, p);
        if (phase != Phase.Open && phase != Phase.Commit) {
            uint40 deadline = t.openedAt + p.commitDuration;
            if (phase <= Phase.Aggregating && block.timestamp > deadline) {
                revert CommitDeadlinePassed(taskId, round, deadline);
            }
            revert WrongPhase(taskId, round, Phase.Commit, phase);
        }
        if (commitment == bytes32(0)) revert EmptyCommitment();
        m.round = round;
        m.status = SubmissionStatus.Committed;
        m.numSamples = 0;
        m.commitment = commitment;
        t.commitCount += 1;
        if (t.phase == Phase.Open) {
            t.phase = Phase.Commit;
            emit PhaseChanged(taskId, round, Phase.Open, Phase.Commit);
        }
        emit UpdateCommitted(taskId, round, msg.sender, commitment);
        _advance(taskId, round, t, p);
    }

    /// @notice Reveal the committed update: its CID, sha256 of the adapter weights, sample count.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param cid IPFS CID of the adapter directory (recorded in the event only).
    /// @param sha256_ sha256 of the adapter weights file; must be new to the task.
    /// @param numSamples Local training samples, 1 to the task's sampleCap.
    /// @param salt The secret salt used in the commitment.
    function revealUpdate(
        uint256 taskId,
        uint32 round,
        string calldata cid,
        bytes32 sha256_,
        uint32 numSamples,
        bytes32 salt
    ) external {
        TaskState storage t = _runningRound(taskId, round);
        Member storage m = _member(taskId, msg.sender);
        _requireApproved(msg.sender);
        if (m.round != round || m.status == SubmissionStatus.None) {
            revert NotCommitted(taskId, round, msg.sender);
        }
        if (m.status != SubmissionStatus.Committed) revert AlreadyRevealed(taskId, round, msg.sender);
        TaskParams storage p = _params[taskId];
        _requireRevealPhase(taskId, round, t, p);
        if (bytes(cid).length == 0) revert EmptyCid();
        if (sha256_ == bytes32(0)) revert EmptyContentHash();
        if (numSamples == 0) revert ZeroSamples();
        if (numSamples > p.sampleCap) revert SamplesAboveCap(taskId, numSamples, p.sampleCap);
        bytes32 actual = _commitment(taskId, round, msg.sender, cid, sha256_, numSamples, salt);
        if (actual != m.commitment) {
            revert CommitmentMismatch(taskId, round, msg.sender, m.commitment, actual);
        }
        if (sha256_ == t.globalSha256) revert CopiedGlobal(taskId, round, sha256_);
        uint32 seen = _revealedIn[taskId][sha256_];
        if (seen != 0) revert DuplicateUpdate(taskId, round, sha256_, seen);
        _revealedIn[taskId][sha256_] = round;
        m.status = SubmissionStatus.Revealed;
        m.numSamples = numSamples;
        t.revealCount += 1;
        emit UpdateRevealed(taskId, round, msg.sender, cid, sha256_, numSamples);
        _advance(taskId, round, t, p);
    }

    /// @notice Report a metric for a round (e.g. local accuracy of that round's global adapter).
    /// @param taskId The task.
    /// @param round Any round of the task up to the current one.
    /// @param metric Metric name, 1 to 32 bytes, once per client per round.
    /// @param value Value scaled by METRIC_SCALE.
    function reportMetric(uint256 taskId, uint32 round, string calldata metric, int256 value) external {
        TaskState storage t = _task(taskId);
        if (round == 0 || round > t.currentRound) revert UnknownRound(taskId, round, t.currentRound);
        _member(taskId, msg.sender);
        _requireApproved(msg.sender);
        uint256 len = bytes(metric).length;
        if (len == 0 || len > 32) revert InvalidMetricName();
        Metric storage mt = _metrics[taskId][round][msg.sender][keccak256(bytes(metric))];
        if (mt.reported) revert MetricAlreadyReported(taskId, round, msg.sender, metric);
        mt.reported = true;
        mt.value = value;
        emit MetricReported(taskId, round, msg.sender, metric, value);
    }

    /// @notice Mint the caller's earned rewards of a task.
    /// @param taskId The task.
    function claimRewards(uint256 taskId) external {
        Member storage m = _members[taskId][msg.sender];
        uint256 amount = m.owed;
        if (amount == 0) revert NothingToClaim(msg.sender);
        m.owed = 0;
        emit RewardsClaimed(taskId, msg.sender, amount);
        rewardToken.mint(msg.sender, amount);
    }

    // ------------------------------------------------------------------ anyone

    /// @notice Close the current round's Commit or Reveal phase before its deadline when every
    ///         participant it still waits for is no longer approved (suspended or revoked).
    /// @dev Also stores any time-driven move. Loops over at most MAX_PARTICIPANTS.
    /// @param taskId The task.
    /// @param round The current round.
    function advancePhase(uint256 taskId, uint32 round) external {
        TaskState storage t = _runningRound(taskId, round);
        TaskParams storage p = _params[taskId];
        _advance(taskId, round, t, p);
        Phase from = t.phase;
        if (from != Phase.Open && from != Phase.Commit && from != Phase.Reveal) {
            revert WrongPhase(taskId, round, Phase.Reveal, from);
        }
        bool committing = from != Phase.Reveal;
        address[] storage all = _participants[taskId];
        for (uint256 i = 0; i < all.length; ++i) {
            Member storage m = _members[taskId][all[i]];
            bool current = m.round == round;
            bool waiting = committing
                ? !current || m.status == SubmissionStatus.None
                : current && m.status == SubmissionStatus.Committed;
            if (waiting && registry.statusOf(all[i]) == Registry.ClientStatus.Approved) {
                revert PhaseStillOpen(taskId, round, all[i]);
            }
        }
        Phase to = committing ? Phase.Reveal : Phase.Aggregating;
        t.phase = to;
        emit PhaseChanged(taskId, round, from, to);
        _advance(taskId, round, t, p);
    }

    // ------------------------------------------------------------------ aggregator

    /// @notice Accept an aggregate for the current round and credit its rewards.
    /// @dev Allowed once the round is Aggregating. Each included client earns
    ///      rewardPerUpdate * included.length * score / sum(scores) (floor), the aggregator
    ///      aggregatorReward, within the budget left. Opens the next round from `aggregateCid`,
    ///      or completes the task.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param aggregateCid IPFS CID of the aggregated adapter.
    /// @param aggregateSha256 sha256 of the aggregated adapter weights file.
    /// @param included The clients whose revealed updates went into the aggregate, ascending.
    /// @param scores Each included client's contribution score, 0 to SCORE_SCALE.
    function submitAggregate(
        uint256 taskId,
        uint32 round,
        string calldata aggregateCid,
        bytes32 aggregateSha256,
        address[] calldata included,
        uint32[] calldata scores
    ) external {
        if (!registry.isAggregator(msg.sender)) revert NotAggregator(msg.sender);
        (TaskState storage t, TaskParams storage p) = _requireAggregating(taskId, round);
        if (bytes(aggregateCid).length == 0) revert EmptyCid();
        if (aggregateSha256 == bytes32(0)) revert EmptyContentHash();
        uint256 total = _checkInclusion(taskId, round, t, p, included, scores);
        _payRewards(taskId, round, t, p, included, scores, total);
        t.phase = Phase.Finalized;
        t.completedRounds += 1;
        t.globalSha256 = aggregateSha256;
        t.globalCidHash = bytes16(keccak256(bytes(aggregateCid)));
        emit PhaseChanged(taskId, round, Phase.Aggregating, Phase.Finalized);
        emit AggregateAccepted(taskId, round, msg.sender, aggregateCid, aggregateSha256, included);
        if (t.completedRounds >= p.numRounds) {
            t.status = TaskStatus.Completed;
            emit TaskCompleted(taskId, aggregateCid);
        } else {
            _openRound(taskId, round + 1, aggregateCid);
        }
    }

    /// @notice Mark an Aggregating round Failed and open a retry (or fail the task).
    /// @dev Aggregators and governance may fail any Aggregating round; anyone may fail one with
    ///      fewer reveals than minParticipants, or once its aggregation deadline passed.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param globalAdapterCid The round's global adapter CID (its RoundOpened event has it);
    ///        the retry starts from it.
    /// @param reason Human-readable reason, recorded in RoundFailed.
    function failRound(uint256 taskId, uint32 round, string calldata globalAdapterCid, string calldata reason)
        external
    {
        (TaskState storage t, TaskParams storage p) = _requireAggregating(taskId, round);
        uint40 deadline = t.openedAt + p.commitDuration + p.revealDuration + p.aggregationDuration;
        if (
            block.timestamp <= deadline && t.revealCount >= p.minParticipants
                && !registry.isAggregator(msg.sender) && !registry.isGovernance(msg.sender)
        ) {
            revert NotAuthorizedToFail(msg.sender, deadline);
        }
        if (bytes16(keccak256(bytes(globalAdapterCid))) != t.globalCidHash) {
            revert WrongGlobalAdapter(taskId, globalAdapterCid);
        }
        t.phase = Phase.Failed;
        t.failedRounds += 1;
        _failedRounds[taskId][round >> 8] |= 1 << (round & 0xff);
        emit PhaseChanged(taskId, round, Phase.Aggregating, Phase.Failed);
        emit RoundFailed(taskId, round, reason);
        if (t.failedRounds > p.maxFailedRounds) {
            t.status = TaskStatus.Failed;
            emit TaskFailed(taskId, reason);
        } else {
            _openRound(taskId, round + 1, globalAdapterCid);
        }
    }

    /// @notice Mint the caller's earned aggregator fees (all tasks).
    function claimFees() external {
        uint256 amount = _feesOwed[msg.sender];
        if (amount == 0) revert NothingToClaim(msg.sender);
        _feesOwed[msg.sender] = 0;
        emit FeesClaimed(msg.sender, amount);
        rewardToken.mint(msg.sender, amount);
    }

    // ------------------------------------------------------------------ batching

    /// @notice Make several calls of this contract as the caller, in order, in one transaction:
    ///         a client folds its metric report into its next commitment or reward claim.
    ///         Any call's revert reverts the whole batch with that call's error.
    /// @dev Each call is a delegatecall into this contract, so `msg.sender` and every check of
    ///      the called function are those of a direct call. No function here is payable, so no
    ///      `msg.value` can be counted once per call.
    /// @param calls ABI-encoded calls of this contract's external functions.
    /// @return results The return data of each call, in order.
    function multicall(bytes[] calldata calls) external returns (bytes[] memory results) {
        if (calls.length == 0) revert EmptyBatch();
        results = new bytes[](calls.length);
        for (uint256 i = 0; i < calls.length; ++i) {
            results[i] = _selfCall(i, calls[i]);
        }
    }

    // ------------------------------------------------------------------ views

    /// @notice Number of tasks created (ids are 1..taskCount).
    function taskCount() external view returns (uint256) {
        return _taskCount;
    }

    /// @notice The parameters of a task.
    /// @param taskId The task.
    function getTaskParams(uint256 taskId) external view returns (TaskParams memory) {
        _task(taskId);
        return _params[taskId];
    }

    /// @notice The state of a task and of its current round (`phase` is the stored one).
    /// @param taskId The task.
    function getTask(uint256 taskId) external view returns (TaskState memory) {
        return _task(taskId);
    }

    /// @notice The participants of a task in join order (at most MAX_PARTICIPANTS).
    /// @param taskId The task.
    function getParticipants(uint256 taskId) external view returns (address[] memory) {
        _task(taskId);
        return _participants[taskId];
    }

    /// @notice Whether `client` joined the task.
    /// @param taskId The task.
    /// @param client The client.
    function isParticipant(uint256 taskId, address client) external view returns (bool) {
        return _members[taskId][client].index != 0;
    }

    /// @notice A round's effective phase and deadlines; counts for the current round only.
    /// @dev Earlier rounds report their outcome (Finalized or Failed) and nothing else: their
    ///      history is in the events.
    /// @param taskId The task.
    /// @param round The round.
    function getRound(uint256 taskId, uint32 round) external view returns (RoundInfo memory info) {
        TaskState storage t = _task(taskId);
        info.phase = _phaseOf(taskId, round, t);
        if (round != t.currentRound || round == 0) return info;
        TaskParams storage p = _params[taskId];
        info.openedAt = t.openedAt;
        info.commitDeadline = t.openedAt + p.commitDuration;
        info.revealDeadline = info.commitDeadline + p.revealDuration;
        info.aggregationDeadline = info.revealDeadline + p.aggregationDuration;
        info.commitCount = t.commitCount;
        info.revealCount = t.revealCount;
    }

    /// @notice The effective phase of a round now, time-driven moves included.
    /// @param taskId The task.
    /// @param round The round (None when it never opened).
    function phaseOf(uint256 taskId, uint32 round) external view returns (Phase) {
        return _phaseOf(taskId, round, _task(taskId));
    }

    /// @notice A client's submission in a round; empty once the client committed in a later
    ///         round (the events keep every submission).
    /// @param taskId The task.
    /// @param round The round.
    /// @param client The client.
    function getSubmission(uint256 taskId, uint32 round, address client)
        external
        view
        returns (Submission memory s)
    {
        Member storage m = _members[taskId][client];
        if (m.round != round || m.status == SubmissionStatus.None) return s;
        return Submission(m.status, m.commitment, m.numSamples);
    }

    /// @notice Rewards a participant earned in a task and has not claimed yet.
    /// @param taskId The task.
    /// @param account The participant.
    function rewardsOwed(uint256 taskId, address account) external view returns (uint256) {
        return _members[taskId][account].owed;
    }

    /// @notice Fees an aggregator earned and has not claimed yet.
    /// @param account The aggregator.
    function feesOwed(address account) external view returns (uint256) {
        return _feesOwed[account];
    }

    /// @notice The round in which `sha256_` was revealed in the task (0: never).
    /// @param taskId The task.
    /// @param sha256_ sha256 of an adapter weights file.
    function revealedIn(uint256 taskId, bytes32 sha256_) external view returns (uint32) {
        return _revealedIn[taskId][sha256_];
    }

    /// @notice A reported metric: whether it was reported and its scaled value.
    /// @param taskId The task.
    /// @param round The round.
    /// @param client The reporting client.
    /// @param metric The metric name.
    function getMetric(uint256 taskId, uint32 round, address client, string calldata metric)
        external
        view
        returns (bool reported, int256 value)
    {
        Metric storage mt = _metrics[taskId][round][client][keccak256(bytes(metric))];
        return (mt.reported, mt.value);
    }

    /// @notice The commitment `sender` must submit for these reveal values in this round.
    /// @param taskId The task.
    /// @param round The round.
    /// @param sender The committing client.
    /// @param cid Adapter CID.
    /// @param sha256_ sha256 of the adapter weights.
    /// @param numSamples Claimed sample count.
    /// @param salt Secret salt.
    function computeCommitment(
        uint256 taskId,
        uint32 round,
        address sender,
        string calldata cid,
        bytes32 sha256_,
        uint32 numSamples,
        bytes32 salt
    ) external view returns (bytes32) {
        return _commitment(taskId, round, sender, cid, sha256_, numSamples, salt);
    }

    // ------------------------------------------------------------------ internals

    function _validate(TaskParams calldata p) private pure {
        if (bytes(p.baseModelId).length == 0) revert InvalidTaskParameter("baseModelId");
        if (bytes(p.hyperParamsCid).length == 0) revert InvalidTaskParameter("hyperParamsCid");
        if ((bytes(p.initialAdapterCid).length == 0) != (p.initialAdapterSha256 == bytes32(0))) {
            revert InvalidTaskParameter("initialAdapterSha256");
        }
        if (p.numRounds == 0) revert InvalidTaskParameter("numRounds");
        if (uint256(p.numRounds) + p.maxFailedRounds >= type(uint32).max) {
            revert InvalidTaskParameter("maxFailedRounds");
        }
        if (p.maxParticipants == 0 || p.maxParticipants > MAX_PARTICIPANTS) {
            revert InvalidTaskParameter("maxParticipants");
        }
        if (p.minParticipants == 0 || p.minParticipants > p.maxParticipants) {
            revert InvalidTaskParameter("minParticipants");
        }
        if (p.sampleCap == 0) revert InvalidTaskParameter("sampleCap");
        if (p.commitDuration == 0 || p.commitDuration > MAX_PHASE_DURATION) {
            revert InvalidTaskParameter("commitDuration");
        }
        if (p.revealDuration == 0 || p.revealDuration > MAX_PHASE_DURATION) {
            revert InvalidTaskParameter("revealDuration");
        }
        if (p.aggregationDuration == 0 || p.aggregationDuration > MAX_PHASE_DURATION) {
            revert InvalidTaskParameter("aggregationDuration");
        }
        if (p.rewardBudget < uint256(p.rewardPerUpdate) * p.maxParticipants + p.aggregatorReward) {
            revert InvalidTaskParameter("rewardBudget");
        }
        if (p.rewardBudget > type(uint128).max) revert InvalidTaskParameter("rewardBudget");
    }

    function _commitment(
        uint256 taskId,
        uint32 round,
        address sender,
        string calldata cid,
        bytes32 sha256_,
        uint32 numSamples,
        bytes32 salt
    ) private view returns (bytes32) {
        return keccak256(
            abi.encode(block.chainid, address(this), taskId, round, sender, cid, sha256_, numSamples, salt)
        );
    }

    function _selfCall(uint256 index, bytes calldata data) private returns (bytes memory ret) {
        bool ok;
        (ok, ret) = address(this).delegatecall(data);
        if (ok) return ret;
        if (ret.length == 0) revert BatchCallFailed(index);
        assembly ("memory-safe") {
            revert(add(ret, 0x20), mload(ret))
        }
    }

    function _task(uint256 taskId) private view returns (TaskState storage t) {
        t = _tasks[taskId];
        if (t.status == TaskStatus.None) revert UnknownTask(taskId);
    }

    function _taskIn(uint256 taskId, TaskStatus expected) private view returns (TaskState storage t) {
        t = _task(taskId);
        if (t.status != expected) revert WrongTaskStatus(taskId, expected, t.status);
    }

    function _runningRound(uint256 taskId, uint32 round) private view returns (TaskState storage t) {
        t = _taskIn(taskId, TaskStatus.Running);
        if (round == 0 || round != t.currentRound) revert UnknownRound(taskId, round, t.currentRound);
    }

    function _member(uint256 taskId, address client) private view returns (Member storage m) {
        m = _members[taskId][client];
        if (m.index == 0) revert NotParticipant(taskId, client);
    }

    function _requireApproved(address client) private view {
        Registry.ClientStatus status = registry.statusOf(client);
        if (status != Registry.ClientStatus.Approved) revert ClientNotApproved(client, status);
    }

    function _requireRevealPhase(uint256 taskId, uint32 round, TaskState storage t, TaskParams storage p)
        private
        view
    {
        Phase phase = _effectivePhase(t, p);
        if (phase == Phase.Reveal) return;
        uint40 deadline = t.openedAt + p.commitDuration + p.revealDuration;
        if (phase == Phase.Aggregating && block.timestamp > deadline) {
            revert RevealDeadlinePassed(taskId, round, deadline);
        }
        revert WrongPhase(taskId, round, Phase.Reveal, phase);
    }

    function _requireAggregating(uint256 taskId, uint32 round)
        private
        returns (TaskState storage t, TaskParams storage p)
    {
        t = _runningRound(taskId, round);
        p = _params[taskId];
        _advance(taskId, round, t, p);
        if (t.phase != Phase.Aggregating) revert WrongPhase(taskId, round, Phase.Aggregating, t.phase);
    }

    /// @dev Checks the inclusion list (ascending, revealed, approved) and the scores; returns
    ///      the sum of the scores.
    function _checkInclusion(
        uint256 taskId,
        uint32 round,
        TaskState storage t,
        TaskParams storage p,
        address[] calldata included,
        uint32[] calldata scores
    ) private view returns (uint256 total) {
        uint256 n = included.length;
        if (n != scores.length) revert LengthMismatch(n, scores.length);
        if (n > t.participantCount) revert TooManyIncluded(taskId, round, n, t.participantCount);
        if (n < p.minParticipants) revert TooFewIncluded(taskId, round, n, p.minParticipants);
        address previous = address(0);
        for (uint256 i = 0; i < n; ++i) {
            address client = included[i];
            if (client <= previous) {
                if (client == previous) revert DuplicateIncluded(taskId, round, client);
                revert UnsortedIncluded(taskId, round, i);
            }
            previous = client;
            Member storage m = _members[taskId][client];
            if (m.round != round || m.status != SubmissionStatus.Revealed) {
                revert NotRevealed(taskId, round, client);
            }
            _requireApproved(client);
            uint32 score = scores[i];
            if (score > SCORE_SCALE) revert ScoreOutOfRange(client, score);
            total += score;
        }
    }

    /// @dev Credits the included clients their shares of the round's pool and the aggregator
    ///      its fee, both within the budget left.
    function _payRewards(
        uint256 taskId,
        uint32 round,
        TaskState storage t,
        TaskParams storage p,
        address[] calldata included,
        uint32[] calldata scores,
        uint256 total
    ) private {
        uint256 remaining = p.rewardBudget - t.rewardsPaid;
        uint256 pool = total == 0 ? 0 : uint256(p.rewardPerUpdate) * included.length;
        if (pool > remaining) pool = remaining;
        remaining -= _creditClients(taskId, round, included, scores, pool, total);
        uint256 fee = p.aggregatorReward < remaining ? p.aggregatorReward : remaining;
        _feesOwed[msg.sender] += fee;
        emit RewardEarned(taskId, round, msg.sender, 0, fee, true);
        t.rewardsPaid = uint128(p.rewardBudget - (remaining - fee));
    }

    /// @dev Credits each included client its share of `pool` and returns the amount credited.
    function _creditClients(
        uint256 taskId,
        uint32 round,
        address[] calldata included,
        uint32[] calldata scores,
        uint256 pool,
        uint256 total
    ) private returns (uint256 paid) {
        for (uint256 i = 0; i < included.length; ++i) {
            uint256 amount = total == 0 ? 0 : (pool * scores[i]) / total;
            Member storage m = _members[taskId][included[i]];
            m.status = SubmissionStatus.Accepted;
            m.owed += uint128(amount);
            paid += amount;
            emit RewardEarned(taskId, round, included[i], scores[i], amount, false);
        }
    }

    function _openRound(uint256 taskId, uint32 round, string memory globalAdapterCid) private {
        TaskParams storage p = _params[taskId];
        TaskState storage t = _tasks[taskId];
        uint40 now_ = uint40(block.timestamp);
        t.currentRound = round;
        t.phase = Phase.Open;
        t.openedAt = now_;
        t.commitCount = 0;
        t.revealCount = 0;
        uint40 commitDeadline = now_ + p.commitDuration;
        uint40 revealDeadline = commitDeadline + p.revealDuration;
        emit RoundOpened(
            taskId, round, globalAdapterCid, commitDeadline, revealDeadline, revealDeadline + p.aggregationDuration
        );
    }

    function _phaseOf(uint256 taskId, uint32 round, TaskState storage t) private view returns (Phase) {
        uint32 current = t.currentRound;
        if (round == 0 || round > current) return Phase.None;
        if (round == current) return _effectivePhase(t, _params[taskId]);
        bool failed = (_failedRounds[taskId][round >> 8] >> (round & 0xff)) & 1 == 1;
        return failed ? Phase.Failed : Phase.Finalized;
    }

    function _effectivePhase(TaskState storage t, TaskParams storage p) private view returns (Phase phase) {
        phase = t.phase;
        if (phase == Phase.Open || phase == Phase.Commit) {
            if (block.timestamp <= t.openedAt + p.commitDuration && t.commitCount < t.participantCount) {
                return phase;
            }
            phase = Phase.Reveal;
        }
        if (phase == Phase.Reveal) {
            if (
                block.timestamp <= uint256(t.openedAt) + p.commitDuration + p.revealDuration
                    && t.revealCount < t.commitCount
            ) return phase;
            phase = Phase.Aggregating;
        }
    }

    /// @dev Stores the effective phase, emitting PhaseChanged when it moved.
    function _advance(uint256 taskId, uint32 round, TaskState storage t, TaskParams storage p) private {
        Phase from = t.phase;
        Phase to = _effectivePhase(t, p);
        if (to != from) {
            t.phase = to;
            emit PhaseChanged(taskId, round, from, to);
        }
    }
}

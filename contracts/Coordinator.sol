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
///         Reveal when every participant has committed or the commit deadline passed, and to
///         Aggregating when every committer has revealed or the reveal deadline passed. The
///         time-driven moves are applied lazily: phaseOf() reports the effective phase and
///         every mutating call stores it (emitting PhaseChanged), so phases only move forward.
///
///         Commitment: keccak256(abi.encode(cid, sha256, numSamples, salt, sender)) with types
///         (string, bytes32, uint64, bytes32, address); the sender binding stops a client from
///         replaying another client's commitment.
///
///         Acceptance: an aggregator submits the aggregate CID with the included clients (each
///         must have revealed, each at most once). Rewards are minted on acceptance to every
///         included client and to the aggregator, within the task's budget. The aggregate CID
///         becomes the next round's global adapter; after numRounds accepted rounds the task is
///         Completed.
///
///         Failure: failRound marks an Aggregating round Failed (terminal for that round) and
///         opens a new attempt (the next round number) from the same global adapter, until
///         more than maxFailedRounds rounds have failed, which ends the task as Failed. An
///         aggregator or governance may fail any Aggregating round; anyone may fail one with
///         fewer reveals than minParticipants, so a dead round never blocks the task.
///
///         Participants per task are capped at MAX_PARTICIPANTS: every loop is bounded by it.
contract Coordinator {
    /// @notice Upper bound on participants per task (bounds every loop in this contract).
    uint32 public constant MAX_PARTICIPANTS = 32;
    /// @notice Fixed-point scale of metric values (0.734 is reported as 734000).
    int256 public constant METRIC_SCALE = 1e6;

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

    /// @notice Parameters fixed when a task is created.
    struct TaskParams {
        string baseModelId;
        bytes32 baseModelHash;
        string hyperParamsCid;
        string initialAdapterCid;
        uint32 numRounds;
        uint32 minParticipants;
        uint32 maxParticipants;
        uint32 maxFailedRounds;
        uint64 commitDuration;
        uint64 revealDuration;
        uint256 rewardPerUpdate;
        uint256 aggregatorReward;
        uint256 rewardBudget;
    }

    /// @notice Mutable state of a task.
    struct TaskState {
        TaskStatus status;
        address creator;
        uint32 currentRound;
        uint32 completedRounds;
        uint32 failedRounds;
        uint32 participantCount;
        uint256 rewardsPaid;
        string globalAdapterCid;
    }

    /// @notice One round (an attempt) of a task. `phase` is the stored phase; see phaseOf.
    struct Round {
        Phase phase;
        uint64 openedAt;
        uint64 commitDeadline;
        uint64 revealDeadline;
        uint32 commitCount;
        uint32 revealCount;
        uint32 acceptedCount;
        address aggregator;
        bytes32 aggregateSha256;
        uint256 rewardsPaid;
        string globalAdapterCid;
        string aggregateCid;
        string failureReason;
    }

    /// @notice One client's update in one round.
    struct Submission {
        bytes32 commitment;
        bytes32 sha256;
        uint64 numSamples;
        uint64 committedAt;
        uint64 revealedAt;
        bool revealed;
        bool accepted;
        string cid;
    }

    struct Metric {
        bool reported;
        int256 value;
    }

    /// @notice Where clients, governance and aggregators are looked up.
    Registry public immutable registry;
    /// @notice The token minted as rewards (this contract must hold its MINTER_ROLE).
    RewardToken public immutable rewardToken;

    uint256 private _taskCount;
    mapping(uint256 => TaskParams) private _params;
    mapping(uint256 => TaskState) private _tasks;
    mapping(uint256 => address[]) private _participants;
    mapping(uint256 => mapping(address => bool)) private _isParticipant;
    mapping(uint256 => mapping(uint32 => Round)) private _rounds;
    mapping(uint256 => mapping(uint32 => mapping(address => Submission))) private _submissions;
    mapping(uint256 => mapping(uint32 => mapping(address => mapping(bytes32 => Metric))))
        private _metrics;

    /// @notice The caller lacks the governance role.
    error NotGovernance(address account);
    /// @notice The caller lacks the aggregator role.
    error NotAggregator(address account);
    /// @notice The caller may not fail this round (it can still reach the minimum).
    error NotAuthorizedToFail(address account);
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
    error TaskFull(uint256 taskId, uint32 maxParticipants);
    /// @notice The client did not join the task.
    error NotParticipant(uint256 taskId, address client);
    /// @notice startTask needs at least minParticipants participants.
    error NotEnoughParticipants(uint256 taskId, uint32 have, uint32 need);
    /// @notice The round does not exist or is not the task's current round.
    error UnknownRound(uint256 taskId, uint32 round, uint32 currentRound);
    /// @notice The round is not in the phase the call needs.
    error WrongPhase(uint256 taskId, uint32 round, Phase expected, Phase actual);
    /// @notice The commit deadline of the round has passed.
    error CommitDeadlinePassed(uint256 taskId, uint32 round, uint64 deadline);
    /// @notice The reveal deadline of the round has passed.
    error RevealDeadlinePassed(uint256 taskId, uint32 round, uint64 deadline);
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
    /// @notice A reveal claimed zero training samples.
    error ZeroSamples();
    /// @notice An included client did not reveal in this round.
    error NotRevealed(uint256 taskId, uint32 round, address client);
    /// @notice A client is listed twice in an aggregate.
    error DuplicateIncluded(uint256 taskId, uint32 round, address client);
    /// @notice The aggregate includes fewer clients than the task's minimum.
    error TooFewIncluded(uint256 taskId, uint32 round, uint256 included, uint32 minimum);
    /// @notice The aggregate lists more clients than the task's participant cap.
    error TooManyIncluded(uint256 taskId, uint32 round, uint256 included, uint32 maximum);
    /// @notice Paying this round would exceed the task's reward budget.
    error RewardBudgetExceeded(uint256 taskId, uint256 required, uint256 remaining);
    /// @notice An empty metric name, or one longer than 32 bytes.
    error InvalidMetricName();
    /// @notice The client already reported this metric for this round.
    error MetricAlreadyReported(uint256 taskId, uint32 round, address client, string metric);

    /// @notice A task was created (its full parameters are in `params`).
    event TaskCreated(uint256 indexed taskId, address indexed creator, TaskParams params);
    /// @notice An approved client joined a task.
    event ParticipantJoined(uint256 indexed taskId, address indexed client, uint32 participantCount);
    /// @notice Governance started a task; round 1 opens in the same transaction.
    event TaskStarted(uint256 indexed taskId, uint32 participantCount);
    /// @notice A round opened: train from `globalAdapterCid` ("" = from the base model).
    event RoundOpened(
        uint256 indexed taskId,
        uint32 indexed round,
        string globalAdapterCid,
        uint64 commitDeadline,
        uint64 revealDeadline
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
        uint64 numSamples
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
    /// @notice A reward was minted to a contributor or (isAggregator) the aggregator.
    event RewardPaid(
        uint256 indexed taskId,
        uint32 indexed round,
        address indexed recipient,
        uint256 amount,
        bool isAggregator
    );
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
    /// @param rewardToken_ The reward token (grant this contract MINTER_ROLE after deploying).
    constructor(Registry registry_, RewardToken rewardToken_) {
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
        t.globalAdapterCid = p.initialAdapterCid;
        emit TaskCreated(taskId, msg.sender, p);
    }

    /// @notice Start a task with its current participants and open round 1.
    /// @param taskId The task.
    function startTask(uint256 taskId) external onlyGovernance {
        TaskState storage t = _taskIn(taskId, TaskStatus.Created);
        uint32 need = _params[taskId].minParticipants;
        if (t.participantCount < need) revert NotEnoughParticipants(taskId, t.participantCount, need);
        t.status = TaskStatus.Running;
        emit TaskStarted(taskId, t.participantCount);
        _openRound(taskId, 1, t.globalAdapterCid);
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
            Phase from = _effectivePhase(taskId, round);
            if (from != Phase.Finalized && from != Phase.Failed) {
                Round storage r = _rounds[taskId][round];
                r.phase = Phase.Failed;
                r.failureReason = reason;
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
        if (_isParticipant[taskId][msg.sender]) revert AlreadyParticipant(taskId, msg.sender);
        uint32 cap = _params[taskId].maxParticipants;
        if (t.participantCount >= cap) revert TaskFull(taskId, cap);
        _isParticipant[taskId][msg.sender] = true;
        _participants[taskId].push(msg.sender);
        t.participantCount += 1;
        emit ParticipantJoined(taskId, msg.sender, t.participantCount);
    }

    /// @notice Commit to an update for the current round (see the contract notes for the hash).
    /// @param taskId The task.
    /// @param round The current round.
    /// @param commitment keccak256(abi.encode(cid, sha256, numSamples, salt, msg.sender)).
    function commitUpdate(uint256 taskId, uint32 round, bytes32 commitment) external {
        _requireClientInRound(taskId, round);
        Submission storage s = _submissions[taskId][round][msg.sender];
        if (s.commitment != bytes32(0)) revert AlreadyCommitted(taskId, round, msg.sender);
        Phase p = _effectivePhase(taskId, round);
        if (p != Phase.Open && p != Phase.Commit) {
            Round storage closed = _rounds[taskId][round];
            if (p <= Phase.Aggregating && block.timestamp > closed.commitDeadline) {
                revert CommitDeadlinePassed(taskId, round, closed.commitDeadline);
            }
            revert WrongPhase(taskId, round, Phase.Commit, p);
        }
        if (commitment == bytes32(0)) revert EmptyCommitment();
        s.commitment = commitment;
        s.committedAt = uint64(block.timestamp);
        Round storage r = _rounds[taskId][round];
        r.commitCount += 1;
        if (r.phase == Phase.Open) {
            r.phase = Phase.Commit;
            emit PhaseChanged(taskId, round, Phase.Open, Phase.Commit);
        }
        emit UpdateCommitted(taskId, round, msg.sender, commitment);
        _advance(taskId, round);
    }

    /// @notice Reveal the committed update: its CID, sha256 of the adapter bytes, sample count.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param cid IPFS CID of the adapter directory.
    /// @param sha256_ sha256 of the adapter weights file.
    /// @param numSamples Local training samples (non-zero; FedAvg weight).
    /// @param salt The secret salt used in the commitment.
    function revealUpdate(
        uint256 taskId,
        uint32 round,
        string calldata cid,
        bytes32 sha256_,
        uint64 numSamples,
        bytes32 salt
    ) external {
        _requireClientInRound(taskId, round);
        Submission storage s = _submissions[taskId][round][msg.sender];
        if (s.commitment == bytes32(0)) revert NotCommitted(taskId, round, msg.sender);
        if (s.revealed) revert AlreadyRevealed(taskId, round, msg.sender);
        _requireRevealPhase(taskId, round);
        if (bytes(cid).length == 0) revert EmptyCid();
        if (numSamples == 0) revert ZeroSamples();
        bytes32 actual = keccak256(abi.encode(cid, sha256_, numSamples, salt, msg.sender));
        if (actual != s.commitment) {
            revert CommitmentMismatch(taskId, round, msg.sender, s.commitment, actual);
        }
        s.revealed = true;
        s.revealedAt = uint64(block.timestamp);
        s.sha256 = sha256_;
        s.numSamples = numSamples;
        s.cid = cid;
        _rounds[taskId][round].revealCount += 1;
        emit UpdateRevealed(taskId, round, msg.sender, cid, sha256_, numSamples);
        _advance(taskId, round);
    }

    /// @notice Report a metric for a round (e.g. local accuracy of that round's global adapter).
    /// @param taskId The task.
    /// @param round Any round of the task up to the current one.
    /// @param metric Metric name, 1 to 32 bytes, once per client per round.
    /// @param value Value scaled by METRIC_SCALE.
    function reportMetric(uint256 taskId, uint32 round, string calldata metric, int256 value) external {
        TaskState storage t = _task(taskId);
        if (round == 0 || round > t.currentRound) revert UnknownRound(taskId, round, t.currentRound);
        if (!_isParticipant[taskId][msg.sender]) revert NotParticipant(taskId, msg.sender);
        _requireApproved(msg.sender);
        uint256 len = bytes(metric).length;
        if (len == 0 || len > 32) revert InvalidMetricName();
        Metric storage m = _metrics[taskId][round][msg.sender][keccak256(bytes(metric))];
        if (m.reported) revert MetricAlreadyReported(taskId, round, msg.sender, metric);
        m.reported = true;
        m.value = value;
        emit MetricReported(taskId, round, msg.sender, metric, value);
    }

    // ------------------------------------------------------------------ aggregator

    /// @notice Accept an aggregate for the current round and pay its rewards.
    /// @dev Allowed once the round is Aggregating (every committer revealed, or the reveal
    ///      deadline passed). Opens the next round from `aggregateCid`, or completes the task.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param aggregateCid IPFS CID of the aggregated adapter.
    /// @param aggregateSha256 sha256 of the aggregated adapter weights file.
    /// @param included The clients whose revealed updates went into the aggregate.
    function submitAggregate(
        uint256 taskId,
        uint32 round,
        string calldata aggregateCid,
        bytes32 aggregateSha256,
        address[] calldata included
    ) external {
        if (!registry.isAggregator(msg.sender)) revert NotAggregator(msg.sender);
        _requireAggregating(taskId, round);
        if (bytes(aggregateCid).length == 0) revert EmptyCid();
        uint256 cost = _checkInclusion(taskId, round, included);

        Round storage r = _rounds[taskId][round];
        r.phase = Phase.Finalized;
        r.aggregateCid = aggregateCid;
        r.aggregateSha256 = aggregateSha256;
        r.aggregator = msg.sender;
        r.acceptedCount = uint32(included.length);
        r.rewardsPaid = cost;
        TaskState storage t = _tasks[taskId];
        t.rewardsPaid += cost;
        t.completedRounds += 1;
        t.globalAdapterCid = aggregateCid;
        emit PhaseChanged(taskId, round, Phase.Aggregating, Phase.Finalized);
        emit AggregateAccepted(taskId, round, msg.sender, aggregateCid, aggregateSha256, included);

        if (t.completedRounds >= _params[taskId].numRounds) {
            t.status = TaskStatus.Completed;
            emit TaskCompleted(taskId, aggregateCid);
        } else {
            _openRound(taskId, round + 1, aggregateCid);
        }
        _payRewards(taskId, round, included);
    }

    /// @notice Mark an Aggregating round Failed and open a retry (or fail the task).
    /// @dev Aggregators and governance may fail any Aggregating round; anyone may fail one
    ///      whose reveals are fewer than minParticipants.
    /// @param taskId The task.
    /// @param round The current round.
    /// @param reason Human-readable reason, recorded on chain and in RoundFailed.
    function failRound(uint256 taskId, uint32 round, string calldata reason) external {
        _requireAggregating(taskId, round);
        Round storage r = _rounds[taskId][round];
        TaskParams storage p = _params[taskId];
        if (
            !registry.isAggregator(msg.sender) && !registry.isGovernance(msg.sender)
                && r.revealCount >= p.minParticipants
        ) {
            revert NotAuthorizedToFail(msg.sender);
        }
        r.phase = Phase.Failed;
        r.failureReason = reason;
        TaskState storage t = _tasks[taskId];
        t.failedRounds += 1;
        emit PhaseChanged(taskId, round, Phase.Aggregating, Phase.Failed);
        emit RoundFailed(taskId, round, reason);
        if (t.failedRounds > p.maxFailedRounds) {
            t.status = TaskStatus.Failed;
            emit TaskFailed(taskId, reason);
        } else {
            _openRound(taskId, round + 1, t.globalAdapterCid);
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

    /// @notice The mutable state of a task.
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
        return _isParticipant[taskId][client];
    }

    /// @notice A round's stored record (its `phase` field is the stored one; see phaseOf).
    /// @param taskId The task.
    /// @param round The round.
    function getRound(uint256 taskId, uint32 round) external view returns (Round memory) {
        _task(taskId);
        return _rounds[taskId][round];
    }

    /// @notice The effective phase of a round now, time-driven moves included.
    /// @param taskId The task.
    /// @param round The round (None when it never opened).
    function phaseOf(uint256 taskId, uint32 round) external view returns (Phase) {
        _task(taskId);
        return _effectivePhase(taskId, round);
    }

    /// @notice A client's submission in a round.
    /// @param taskId The task.
    /// @param round The round.
    /// @param client The client.
    function getSubmission(uint256 taskId, uint32 round, address client)
        external
        view
        returns (Submission memory)
    {
        return _submissions[taskId][round][client];
    }

    /// @notice The clients included in a round's accepted aggregate, in join order.
    /// @param taskId The task.
    /// @param round The round.
    function getIncluded(uint256 taskId, uint32 round) external view returns (address[] memory out) {
        address[] storage all = _participants[taskId];
        out = new address[](_rounds[taskId][round].acceptedCount);
        uint256 k;
        for (uint256 i = 0; i < all.length; ++i) {
            if (_submissions[taskId][round][all[i]].accepted) out[k++] = all[i];
        }
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
        Metric storage m = _metrics[taskId][round][client][keccak256(bytes(metric))];
        return (m.reported, m.value);
    }

    /// @notice The commitment a client must submit for these reveal values.
    /// @param cid Adapter CID.
    /// @param sha256_ sha256 of the adapter weights.
    /// @param numSamples Local sample count.
    /// @param salt Secret salt.
    /// @param sender The committing client.
    function computeCommitment(
        string calldata cid,
        bytes32 sha256_,
        uint64 numSamples,
        bytes32 salt,
        address sender
    ) external pure returns (bytes32) {
        return keccak256(abi.encode(cid, sha256_, numSamples, salt, sender));
    }

    // ------------------------------------------------------------------ internals

    function _validate(TaskParams calldata p) private pure {
        if (bytes(p.baseModelId).length == 0) revert InvalidTaskParameter("baseModelId");
        if (bytes(p.hyperParamsCid).length == 0) revert InvalidTaskParameter("hyperParamsCid");
        if (p.numRounds == 0) revert InvalidTaskParameter("numRounds");
        if (p.maxParticipants == 0 || p.maxParticipants > MAX_PARTICIPANTS) {
            revert InvalidTaskParameter("maxParticipants");
        }
        if (p.minParticipants == 0 || p.minParticipants > p.maxParticipants) {
            revert InvalidTaskParameter("minParticipants");
        }
        if (p.commitDuration == 0) revert InvalidTaskParameter("commitDuration");
        if (p.revealDuration == 0) revert InvalidTaskParameter("revealDuration");
        if (p.rewardPerUpdate > (type(uint256).max - p.aggregatorReward) / p.maxParticipants) {
            revert InvalidTaskParameter("rewardPerUpdate");
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

    function _requireApproved(address client) private view {
        Registry.ClientStatus status = registry.statusOf(client);
        if (status != Registry.ClientStatus.Approved) revert ClientNotApproved(client, status);
    }

    function _requireCurrentRound(uint256 taskId, uint32 round) private view {
        TaskState storage t = _taskIn(taskId, TaskStatus.Running);
        if (round == 0 || round != t.currentRound) revert UnknownRound(taskId, round, t.currentRound);
    }

    function _requireClientInRound(uint256 taskId, uint32 round) private view {
        _requireCurrentRound(taskId, round);
        if (!_isParticipant[taskId][msg.sender]) revert NotParticipant(taskId, msg.sender);
        _requireApproved(msg.sender);
    }

    function _requireRevealPhase(uint256 taskId, uint32 round) private view {
        Phase p = _effectivePhase(taskId, round);
        if (p == Phase.Reveal) return;
        Round storage r = _rounds[taskId][round];
        if (p == Phase.Aggregating && block.timestamp > r.revealDeadline) {
            revert RevealDeadlinePassed(taskId, round, r.revealDeadline);
        }
        revert WrongPhase(taskId, round, Phase.Reveal, p);
    }

    function _requireAggregating(uint256 taskId, uint32 round) private {
        _requireCurrentRound(taskId, round);
        _advance(taskId, round);
        Phase p = _rounds[taskId][round].phase;
        if (p != Phase.Aggregating) revert WrongPhase(taskId, round, Phase.Aggregating, p);
    }

    /// @dev Checks the inclusion list, marks each included submission accepted, returns cost.
    function _checkInclusion(uint256 taskId, uint32 round, address[] calldata included)
        private
        returns (uint256 cost)
    {
        TaskParams storage p = _params[taskId];
        uint256 n = included.length;
        if (n > p.maxParticipants) revert TooManyIncluded(taskId, round, n, p.maxParticipants);
        if (n < p.minParticipants) revert TooFewIncluded(taskId, round, n, p.minParticipants);
        cost = p.rewardPerUpdate * n + p.aggregatorReward;
        uint256 remaining = p.rewardBudget - _tasks[taskId].rewardsPaid;
        if (cost > remaining) revert RewardBudgetExceeded(taskId, cost, remaining);
        for (uint256 i = 0; i < n; ++i) {
            address client = included[i];
            Submission storage s = _submissions[taskId][round][client];
            if (!s.revealed) revert NotRevealed(taskId, round, client);
            if (s.accepted) revert DuplicateIncluded(taskId, round, client);
            _requireApproved(client);
            s.accepted = true;
        }
    }

    function _payRewards(uint256 taskId, uint32 round, address[] calldata included) private {
        TaskParams storage p = _params[taskId];
        uint256 each = p.rewardPerUpdate;
        if (each > 0) {
            for (uint256 i = 0; i < included.length; ++i) {
                emit RewardPaid(taskId, round, included[i], each, false);
                rewardToken.mint(included[i], each);
            }
        }
        uint256 fee = p.aggregatorReward;
        if (fee > 0) {
            emit RewardPaid(taskId, round, msg.sender, fee, true);
            rewardToken.mint(msg.sender, fee);
        }
    }

    function _openRound(uint256 taskId, uint32 round, string memory globalAdapterCid) private {
        TaskParams storage p = _params[taskId];
        Round storage r = _rounds[taskId][round];
        uint64 now_ = uint64(block.timestamp);
        r.phase = Phase.Open;
        r.openedAt = now_;
        r.commitDeadline = now_ + p.commitDuration;
        r.revealDeadline = r.commitDeadline + p.revealDuration;
        r.globalAdapterCid = globalAdapterCid;
        _tasks[taskId].currentRound = round;
        emit RoundOpened(taskId, round, globalAdapterCid, r.commitDeadline, r.revealDeadline);
    }

    function _effectivePhase(uint256 taskId, uint32 round) private view returns (Phase p) {
        Round storage r = _rounds[taskId][round];
        p = r.phase;
        if (p == Phase.Open || p == Phase.Commit) {
            if (block.timestamp <= r.commitDeadline && r.commitCount < _tasks[taskId].participantCount) {
                return p;
            }
            p = Phase.Reveal;
        }
        if (p == Phase.Reveal) {
            if (block.timestamp <= r.revealDeadline && r.revealCount < r.commitCount) return p;
            p = Phase.Aggregating;
        }
    }

    /// @dev Stores the effective phase, emitting PhaseChanged when it moved.
    function _advance(uint256 taskId, uint32 round) private {
        Round storage r = _rounds[taskId][round];
        Phase from = r.phase;
        Phase to = _effectivePhase(taskId, round);
        if (to != from) {
            r.phase = to;
            emit PhaseChanged(taskId, round, from, to);
        }
    }
}

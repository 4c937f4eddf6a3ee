"""Privacy of hospital updates, piece by piece: sealed objects (HPKE key wraps, AES-256-GCM),
encryption key files, the task spec's privacy section, the accountant against known values, and
client-level DP noise that only a seed holder regenerates. The end-to-end federation with sealed
updates, an auditor and central DP is in tests/test_privacy_federation.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from prismesh.chain.privacy import (
    BudgetExceeded,
    PrivacySpec,
    check_budget,
    client_epsilon,
    epsilon,
    privacy_report,
    sample_epsilon,
)
from prismesh.chain.sealing import (
    NotARecipient,
    NotSealed,
    Recipient,
    SealContext,
    SealError,
    Tampered,
    WrongContext,
    box_key_from_signing_key,
    bundle_dir,
    load_box_key,
    new_box_key,
    open_sealed,
    open_to_dir,
    public_key_bytes,
    read_header,
    save_box_key,
    seal,
    seal_dir,
)
from prismesh.chain.taskspec import TaskSpec, TaskSpecError

AGG, AUDITOR, CLIENT = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20


def ctx(**kw) -> SealContext:
    values = dict(chain_id=31337, coordinator="0x" + "d4" * 20, task=1, round=2, sender=CLIENT, kind="update")
    values.update(kw)
    return SealContext(**values)


def test_sealed_object_opens_for_each_recipient_and_fails_clearly_otherwise(tmp_path: Path) -> None:
    agg, aud, outsider = new_box_key(), new_box_key(), new_box_key()
    recipients = [Recipient(AGG, public_key_bytes(agg)), Recipient(AUDITOR, public_key_bytes(aud))]
    plaintext = b"adapter weights " * 64
    blob = seal(plaintext, recipients, ctx())
    assert plaintext not in blob and b"adapter weights" not in blob
    header = read_header(blob)
    assert header.context == ctx() and header.recipient_addresses() == [AGG, AUDITOR]
    assert open_sealed(blob, agg, ctx()) == plaintext == open_sealed(blob, aud, ctx())
    # Encryption is randomised: sealing twice gives other bytes (and another CID).
    assert seal(plaintext, recipients, ctx()) != blob

    with pytest.raises(NotARecipient, match=r"task 1 round 2 update of client 0xc3c3.*is sealed to 0xa1a1"):
        open_sealed(blob, outsider, ctx())
    with pytest.raises(WrongContext, match="sealed for task 1 round 2 .*not for task 1 round 3"):
        open_sealed(blob, agg, ctx(round=3))
    with pytest.raises(WrongContext, match="not for task 1 round 2 update of client 0xa1a1"):
        open_sealed(blob, agg, ctx(sender=AGG))
    flipped = blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:]
    with pytest.raises(Tampered, match="task 1 round 2 update of client 0xc3c3.*ciphertext fails authentication"):
        open_sealed(flipped, agg)
    # A header edited to claim another round fails the wrapped key's authentication.
    moved = blob.replace(b'"round":2', b'"round":3')
    with pytest.raises(Tampered, match="task 1 round 3 .*data key wrapped for .* fails authentication"):
        open_sealed(moved, agg)
    with pytest.raises(SealError, match="truncated"):
        open_sealed(blob[:40], agg)
    with pytest.raises(NotSealed):
        open_sealed(b"{\"peft_type\": \"LORA\"}", agg)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00\x01" * 100)
    opened = open_to_dir(seal_dir(adapter, recipients, ctx()), aud, tmp_path / "opened", ctx())
    assert bundle_dir(opened) == bundle_dir(adapter)


def test_encryption_key_files_are_encrypted_at_rest(tmp_path: Path) -> None:
    key = new_box_key()
    path = save_box_key(key, tmp_path / "node.json.x25519.pem", "correct horse")
    assert path.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert public_key_bytes(load_box_key(path, "correct horse")) == public_key_bytes(key)
    with pytest.raises(ValueError, match="cannot open encryption key"):
        load_box_key(path, "wrong")
    with pytest.raises(ValueError, match="not found"):
        load_box_key(tmp_path / "missing.pem", "x")
    # Devnet accounts derive theirs from the signing key: stable, and distinct per account.
    a = public_key_bytes(box_key_from_signing_key(b"\x01" * 32))
    assert a == public_key_bytes(box_key_from_signing_key(b"\x01" * 32)) != public_key_bytes(box_key_from_signing_key(b"\x02" * 32))


def test_privacy_section_is_validated_and_leaves_plain_specs_unchanged() -> None:
    base = dict(base_model_id="m", base_model_sha256="0" * 64, strategy="fedavg-exact")
    plain = TaskSpec(**base)
    assert b"privacy" not in plain.to_bytes() and not plain.privacy_spec.sealed
    spec = TaskSpec(**base, privacy={"recipients": [AGG, AUDITOR], "aggregate": "members",
                                     "client_dp": {"clip": 1.0, "noise_multiplier": 1.1},
                                     "delta": 1e-5, "epsilon_budget": 8, "on_budget": "stop"})
    assert TaskSpec.from_bytes(spec.to_bytes()) == spec
    p = spec.privacy_spec
    assert p.sealed and p.central_dp and p.aggregate == "members" and p.epsilon_budget == 8
    bad = [
        ({"recipients": ["0x12"]}, "recipients' must be a list of 0x addresses"),
        ({"recipients": [AGG, AGG.upper().replace("0X", "0x")]}, "lists an address twice"),
        ({"aggregate": "members"}, "needs 'privacy.recipients'"),
        ({"client_dp": {"clip": 1.0, "noise_multiplier": 1.0}}, "protects only the aggregate"),
        ({"client_dp": {"clip": 0, "noise_multiplier": 1.0, "where": "client"}}, "client_dp.clip' must be a number > 0"),
        ({"client_dp": {"clip": 1, "noise_multiplier": 1.0, "where": "server"}}, "client_dp.where' must be one of"),
        ({"delta": 1.5}, "delta' must be a number in"),
        ({"epsilon_budget": -1}, "epsilon_budget' must be a number > 0"),
        ({"accountant": "moments"}, "accountant' must be one of"),
        ({"epsilon": 1}, r"unknown field\(s\) \['epsilon'\]"),
    ]
    for privacy, message in bad:
        with pytest.raises(TaskSpecError, match=message):
            TaskSpec(**base, privacy=privacy)
    with pytest.raises(TaskSpecError, match="'fedavg-exact' with client-level DP at the aggregator"):
        TaskSpec(**{**base, "strategy": "fedavg"}, privacy={"recipients": [AGG], "client_dp": {"clip": 1, "noise_multiplier": 1}})
    with pytest.raises(TaskSpecError, match="train.dp_noise_multiplier' must be a number >= 0"):
        TaskSpec(**base, train={"dp_noise_multiplier": -1})


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a Gaussian mechanism with sensitivity/σ = mu, exactly (Balle & Wang 2018, Thm. 8):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), solved for ε by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    d = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def _rdp_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-sampled Gaussian at an integer order (Mironov et al. 2019, Eq. 3.3)."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)


def test_accountant_against_known_values() -> None:
    # Client level: every hospital in every round, so T rounds compose to one Gaussian with
    # multiplier σ/√T, whose exact ε is known in closed form.
    sigma, rounds, delta = 2.0, 3, 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    assert 3.70 < exact < 3.72  # μ = √3/2 at δ = 1e-5
    prv = epsilon(sigma, 1.0, rounds, delta, "prv")
    rdp = epsilon(sigma, 1.0, rounds, delta, "rdp")
    assert abs(prv - exact) / exact < 0.02, (prv, exact)
    assert exact <= rdp < 1.25 * exact, (rdp, exact)  # RDP is an upper bound, a little loose
    # Sample level (DP-SGD): q = 256/60000, σ = 1.1, 60 epochs (Abadi et al.'s MNIST setting);
    # RDP at integer orders, computed here from the formula, with the same RDP → (ε, δ) conversion.
    q, sgd_sigma, steps = 256 / 60000, 1.1, 60 * 60000 // 256
    ours = epsilon(sgd_sigma, q, steps, delta, "rdp")
    by_hand = min(steps * _rdp_sampled_gaussian(q, sgd_sigma, a) + math.log((a - 1) / a)
                  - (math.log(delta) + math.log(a)) / (a - 1) for a in range(2, 64))
    assert by_hand * 0.97 <= ours <= by_hand * 1.0001, (ours, by_hand)
    assert 2.4 < ours < 2.8
    # More noise, less ε; more rounds, more ε; no steps, nothing spent.
    assert epsilon(4.0, 1.0, 3, delta) < rdp < epsilon(2.0, 1.0, 6, delta)
    assert epsilon(2.0, 1.0, 0, delta) == 0.0


def test_epsilon_report_and_budget() -> None:
    privacy = PrivacySpec.from_dict({"recipients": [AGG], "client_dp": {"clip": 1.0, "noise_multiplier": 2.0},
                                     "epsilon_budget": 4.0})
    per_round = privacy_report(privacy, {"dp_noise_multiplier": 1.0, "batch_size": 1, "grad_accum": 4}, 3,
                               {CLIENT: 400})
    eps = per_round["client_epsilon_per_round"]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2] == per_round["client_epsilon"]
    assert eps[2] == pytest.approx(client_epsilon(privacy, 3), abs=1e-6)
    assert per_round["sample_epsilon"][CLIENT] == pytest.approx(sample_epsilon(privacy, {"dp_noise_multiplier": 1.0}, 400, 3), abs=1e-6)
    assert check_budget(privacy, 3.9, "round 3") is None
    with pytest.raises(BudgetExceeded, match=r"round 4: ε = 4.5 at δ = 1e-05 exceeds the task's budget ε = 4"):
        check_budget(privacy, 4.5, "round 4")
    warn = PrivacySpec.from_dict({**privacy.to_dict(), "on_budget": "warn"})
    assert "exceeds" in check_budget(warn, 4.5, "round 4")


def _adapter(seed: int, out: int = 12, inp: int = 10, r: int = 2, scale: float = 0.1):
    from prismesh.aggregator.adapters import Adapter

    rng = np.random.default_rng(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    return Adapter(config, {key + ".lora_A.weight": rng.standard_normal((r, inp)).astype(np.float32) * scale,
                            key + ".lora_B.weight": rng.standard_normal((out, r)).astype(np.float32) * scale})


def _delta_w(adapter, base=None) -> np.ndarray:
    m = adapter.lora_modules()[0]
    w = adapter.scaling(m) * (np.asarray(adapter.tensors[m + ".lora_B.weight"], np.float64)
                              @ np.asarray(adapter.tensors[m + ".lora_A.weight"], np.float64))
    return w if base is None else w - _delta_w(base)


def test_dp_noise_is_seeded_reproducible_and_bounded() -> None:
    from prismesh.aggregator.dp import dp_aggregate, noise_matrix, privatize_update

    base = _adapter(0)
    updates = [_adapter(i) for i in (1, 2, 3)]
    seed, other = bytes(range(32)), bytes(range(1, 33))
    one, metrics = dp_aggregate(updates, base, dict(base.config), 0.05, 1.0, 4, seed)
    again, _ = dp_aggregate(updates, base, dict(base.config), 0.05, 1.0, 4, seed)
    elsewhere, _ = dp_aggregate(updates, base, dict(base.config), 0.05, 1.0, 4, other)
    key = sorted(one.tensors)[0]
    assert all(np.array_equal(one.tensors[k], again.tensors[k]) for k in one.tensors)
    assert not np.array_equal(one.tensors[key], elsewhere.tensors[key])
    # Every update here is larger than the clip bound, so each was scaled to exactly it.
    assert all(n > 0.05 for n in metrics["update_norms"])
    assert all(math.isclose(c * n, 0.05, rel_tol=1e-9) for c, n in zip(metrics["clip_factors"], metrics["update_norms"], strict=True))
    # The noise is a pure function of (seed, module), standard normal.
    z = noise_matrix(seed, "m", (400, 300))
    assert np.array_equal(z, noise_matrix(seed, "m", (400, 300))) and not np.array_equal(z, noise_matrix(seed, "n", (400, 300)))
    assert abs(z.std() - 1) < 0.01 and abs(z.mean()) < 0.01
    with pytest.raises(ValueError, match="32 bytes"):
        noise_matrix(b"short", "m", (2, 2))
    # Local DP: without noise to speak of, the released change is the clipped update itself
    # (from the bare base model, where the rank-r truncation loses nothing).
    quiet, m2 = privatize_update(updates[0], None, 0.05, 1e-9, seed)
    assert np.linalg.norm(_delta_w(quiet)) == pytest.approx(0.05, rel=1e-6)
    assert m2["clip_factor"] < 1


def test_dp_sgd_trains_lora_with_secret_reproducible_noise(tmp_path: Path) -> None:
    """DP-SGD (Opacus) on PEFT's LoRA layers: the steps the accountant counts, the same adapter
    from the same secret seed, another from another seed, and no run without a seed."""
    from prismesh.chain.privacy import dp_sgd_steps
    from prismesh.node.data import load_jsonl
    from prismesh.node.trainer import TrainConfig, TrainConfigError, train_lora
    from tests.conftest import tiny_federation_inputs

    base, clients = tiny_federation_inputs(tmp_path / "bench")
    examples = load_jsonl(clients[0].train_path)[:12]
    cfg = TrainConfig(rank=4, alpha=8, dropout=0.0, max_length=96, lr=1e-2, target_modules=("q_proj", "v_proj"),
                      batch_size=2, grad_accum=2, dp_noise_multiplier=1.0, dp_clip=0.5)
    with pytest.raises(TrainConfigError, match="noise_seed"):
        train_lora(base, examples, tmp_path / "none", cfg, progress=False)
    a = train_lora(base, examples, tmp_path / "a", cfg, progress=False, noise_seed=11)
    b = train_lora(base, examples, tmp_path / "b", cfg, progress=False, noise_seed=11)
    c = train_lora(base, examples, tmp_path / "c", cfg, progress=False, noise_seed=12)
    weights = lambda r: (r.adapter_dir / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b) != weights(c)
    rate, steps = dp_sgd_steps(len(examples), cfg.to_dict())
    assert a.metrics["dp_sgd"]["steps"] == steps == a.metrics["optimizer_steps"] == math.ceil(len(examples) / 4)
    assert a.metrics["dp_sgd"]["sample_rate"] == pytest.approx(rate) == pytest.approx(4 / len(examples))


def test_keys_box_commands(tmp_path: Path, capsys, monkeypatch) -> None:
    """``prismesh keys box new / show``: a key file beside the keystore, encrypted with its
    password; one-line errors for an existing file, a devnet account and a wrong password."""
    import json

    from tests.test_cli import one_error_line, run

    monkeypatch.setenv("PRISMESH_KEYSTORE_PASSWORD", "pw")
    keystore = tmp_path / "node.json"
    assert run(["keys", "new", "--out", str(keystore), "--pbkdf2-iterations", "2"], capsys)[0] == 0
    code, out, _ = run(["keys", "box", "new", "--keystore", str(keystore)], capsys)
    made = json.loads(out)
    assert code == 0 and made["key_file"] == str(tmp_path / "node.json.x25519.pem")
    code, out, _ = run(["keys", "box", "show", "--keystore", str(keystore)], capsys)
    assert code == 0 and json.loads(out)["public_key"] == made["public_key"]
    code, _, err = run(["keys", "box", "new", "--keystore", str(keystore)], capsys)
    assert code == 1 and "exists; use --force" in one_error_line(err)
    code, _, err = run(["keys", "box", "new", "--keystore", "dev:3"], capsys)
    assert code == 2 and "derive their encryption key" in one_error_line(err)
    code, _, err = run(["keys", "box", "publish", "--keystore", str(keystore)], capsys)
    assert code == 2 and "--manifest" in one_error_line(err)
    monkeypatch.setenv("PRISMESH_KEYSTORE_PASSWORD", "wrong")
    code, _, err = run(["audit", "--manifest", "m.json", "--task", "1", "--key", str(tmp_path / "node.json.x25519.pem")], capsys)
    assert code == 1 and one_error_line(err).startswith("error: cannot open encryption key")

"""The command line's contract: one ``error:`` line, exit 2 for a wrong command line and 1 for a
failure at run time, role names instead of hashes, a quiet end when the reader goes away."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prismesh import __version__
from prismesh.chain.evm.devnet import free_port
from prismesh.chain.taskspec import TRAIN_FIELDS, TaskSpec, TaskSpecError
from prismesh.cli import main
from prismesh.node.trainer import TrainConfig

PRISMESH = [sys.executable, "-m", "prismesh"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: --version, --help and usage errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"prismesh {__version__}"


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["govern", "status"], capsys)  # --manifest missing
    assert code == 2 and "--manifest" in one_error_line(err)
    code, _, err = run(["no-such-command"], capsys)
    assert code == 2 and "invalid choice" in one_error_line(err)
    code, _, err = run(["ipfs", "--store", "s3:bucket", "pin", "ls"], capsys)
    assert code == 2 and "--store" in one_error_line(err)


def test_train_fields_are_the_trainers(capsys: pytest.CaptureFixture[str]) -> None:
    host_or_lora = {"rank", "alpha", "dropout", "target_modules", "device"}
    trainer = {f.name for f in dataclasses.fields(TrainConfig)} - host_or_lora
    assert set(TRAIN_FIELDS) == trainer


@pytest.mark.parametrize(
    "train, needle",
    [({"lrr": 1e-3}, "unknown field(s) ['lrr']"), ({"lr": -1}, "'train.lr' must be a number > 0"),
     ({"epochs": 1.5}, "train.epochs"), ({"bf16": "yes"}, "train.bf16")],
)
def test_task_spec_refuses_bad_training_settings(train: dict, needle: str) -> None:
    with pytest.raises(TaskSpecError, match="known|must be") as info:
        TaskSpec(base_model_id="m", base_model_sha256="0" * 64, train=train)
    assert needle in str(info.value)


def test_make_spec_refuses_a_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (model / "model.safetensors").write_bytes(b"x")
    out = tmp_path / "spec.json"
    code, _, err = run(["govern", "make-spec", "--base-model", str(model), "--train", '{"lrr": 1e-3}',
                        "--out", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and "'lrr'" in line and "'lr'" in line and not out.exists()
    code, _, _ = run(["govern", "make-spec", "--base-model", str(model), "--train", '{"lr": 1e-3}',
                      "--out", str(out)], capsys)
    assert code == 0 and json.loads(out.read_text())["train"] == {"lr": 1e-3}
    assert json.loads(out.read_text())["strategy"] == "clipped-fedavg"  # the robust default
    code, _, err = run(["govern", "make-spec", "--base-model", str(model), "--strategy", "krum",
                        "--strategy-options", '{"q": 1}', "--out", str(out)], capsys)
    assert code == 2 and "--strategy: bad options ['q'] for strategy 'krum'" in one_error_line(err)
    code, _, _ = run(["govern", "make-spec", "--base-model", str(model), "--strategy", "clipped-fedavg",
                      "--strategy-options", '{"clip": 1.5}', "--out", str(out)], capsys)
    assert code == 0 and json.loads(out.read_text())["strategy_options"] == {"clip": 1.5}


def test_experiment_refuses_an_unknown_attack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["experiment", "--out", str(tmp_path), "--attack", "nope"], capsys)
    assert code == 2 and "--attack 'nope' is not an attack; choose from sign-flip" in one_error_line(err)
    code, _, err = run(["experiment", "--out", str(tmp_path), "--malicious", "2"], capsys)
    assert code == 2 and "--malicious needs --attack" in one_error_line(err)


def test_dead_rpc_is_one_line(chain_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    dead = dataclasses.replace(chain_env.manifest, rpc_url=f"http://127.0.0.1:{free_port()}")
    dead.save(manifest)
    code, _, err = run(["govern", "status", "--manifest", str(manifest)], capsys)
    assert code == 1 and "no chain answers" in one_error_line(err)


def test_contract_refusals_are_named(chain_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = chain_env.manifest.save(tmp_path / "m.json")
    code, _, err = run(["govern", "status", "--manifest", str(manifest), "7"], capsys)
    assert code == 1 and "UnknownTask(taskId=7)" in one_error_line(err)
    outsider = chain_env.outsiders[0]
    code, _, err = run(["govern", "approve", "--manifest", str(manifest), outsider.address], capsys)
    assert code == 1 and "NotRegistered" in one_error_line(err)
    code, _, err = run(["govern", "add-aggregator", "--manifest", str(manifest), "--account", "dev:5",
                        outsider.address], capsys)
    line = one_error_line(err)
    assert code == 1 and "DEFAULT_ADMIN_ROLE" in line and "0x0000" not in line
    code, out, _ = run(["govern", "status", "--manifest", str(manifest)], capsys)
    assert code == 0 and json.loads(out) == {"tasks": []}


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--debug", "govern", "status", "--manifest", str(tmp_path / "none.json")], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: manifest not found")


def test_fund_gives_a_fresh_key_gas(chain_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eth_account import Account

    manifest = chain_env.manifest.save(tmp_path / "m.json")
    fresh = Account.create().address
    code, out, _ = run(["govern", "fund", "--manifest", str(manifest), fresh], capsys)
    assert code == 0 and chain_env.w3.eth.get_balance(fresh) == 10 * 10**18
    code, _, err = run(["govern", "fund", "--manifest", str(manifest), "0x1234"], capsys)
    assert code == 2 and "not an address" in one_error_line(err)


def test_claim_mints_what_a_key_earned_and_status_shows_scores(chain_env, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import commit_reveal_all, open_task

    env = chain_env
    manifest = env.manifest.save(tmp_path / "m.json")
    a, b = env.clients[:2]  # devnet accounts 2 and 3
    task = open_task(env, [a, b], reward_per_update=50, aggregator_reward=7, reward_budget=500)
    commit_reveal_all(env, task, 1, [a, b])
    env.coordinator(env.aggregator).submit_aggregate(task, 1, "bafyagg", b"\x01" * 32, {a.address: 3, b.address: 1})
    code, out, _ = run(["govern", "status", "--manifest", str(manifest), str(task)], capsys)
    status = json.loads(out)
    assert code == 0 and status["rounds"][0]["rewards"][a.address] == {"score": 3, "reward": 75}
    assert status["weighting"] == "samples" and status["rewards_paid"] == 107
    code, out, _ = run(["claim", "--manifest", str(manifest), "--account", "dev:2"], capsys)
    assert code == 0 and f"task {task}: claimed 75" in out and env.token().balance_of(a.address) == 75
    code, out, _ = run(["claim", "--manifest", str(manifest), "--account", "dev:2", "--task", str(task)], capsys)
    assert code == 0 and "nothing to claim" in out
    code, out, _ = run(["claim", "--manifest", str(manifest), "--account", "dev:1", "--fees"], capsys)
    assert code == 0 and "aggregator fees: claimed 7" in out
    assert env.token().total_supply() == 82


def test_pipe_into_head_ends_quietly(tmp_path: Path) -> None:
    from prismesh.chain.storage import EmbeddedStore

    store = EmbeddedStore(tmp_path / "ipfs")
    for i in range(2000):  # more than a pipe buffer of `pin ls` lines
        store.add_bytes(f"object {i}".encode())
    big = store.add_bytes(os.urandom(1 << 20))
    env = {**os.environ, "PRISMESH_IPFS": f"embedded:{tmp_path / 'ipfs'}"}
    for command in ("ipfs pin ls | head -1", f"ipfs cat {big} | head -c 10"):
        proc = subprocess.run(f"{' '.join(PRISMESH)} {command}", shell=True, env=env,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == b"", (command, proc.stderr[-2000:])
        assert proc.stdout


def test_learn_evaluate_names_test_sets_by_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented form (`--data out/bench/*/test.jsonl`): three files all named test.jsonl
    stay three entries, named by their folders; a clash of explicit names is refused."""
    from tests.conftest import tiny_federation_inputs

    base, clients = tiny_federation_inputs(tmp_path)
    files = [str(c.test_path) for c in clients]
    code, out, err = run(["learn", "evaluate", "--base-model", str(base), "--data", *files], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["accuracy"]) == {c.name for c in clients}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values()) and "min_acc" in result
    code, _, err = run(["learn", "evaluate", "--base-model", str(base), "--data", f"x={files[0]}", f"x={files[1]}"], capsys)
    assert code == 2 and "both named 'x'" in one_error_line(err)


def test_ipfs_add_reads_stdin_and_wraps_like_kubo(tmp_path: Path) -> None:
    env = {**os.environ, "PRISMESH_IPFS": f"embedded:{tmp_path / 'ipfs'}"}

    def ipfs(*args: str, stdin: bytes | None = None, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run([*PRISMESH, "ipfs", *args], input=stdin, env=env, cwd=cwd,
                              capture_output=True, timeout=120)

    # `echo hello | ipfs add`: Kubo names a piped file by its CID
    res = ipfs("add", stdin=b"hello\n")
    cid = "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN"
    assert res.returncode == 0 and res.stdout.decode().strip() == f"added {cid} {cid}"
    assert ipfs("cat", cid).stdout == b"hello\n"
    # -w: a directory naming the file, the same node as adding a directory holding only it
    folder = tmp_path / "only"
    folder.mkdir()
    (folder / "mars.txt").write_text("Hello Mars!\n")
    res = ipfs("add", "-w", str(folder / "mars.txt"))
    lines = res.stdout.decode().splitlines()
    assert res.returncode == 0 and lines[0] == "added QmPrrHqJzto9m7SyiRzarwkqPcCSsKR2EB1AyqJfe8L8tN mars.txt"
    wrapped = lines[-1].split()[1]
    assert lines[-1] == f"added {wrapped}"
    assert ipfs("add", "-r", "-Q", "-n", str(folder)).stdout.decode().strip() == wrapped
    # get without -o writes ./CID, and refuses to overwrite it
    res = ipfs("get", wrapped)
    assert res.returncode == 0 and (tmp_path / wrapped / "mars.txt").read_text() == "Hello Mars!\n"
    res = ipfs("get", wrapped)
    assert res.returncode == 1 and b"already exists" in res.stderr

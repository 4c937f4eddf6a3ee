"""Every command the README and docs/ show must work.

Two layers. Every ``prismesh ...`` command line in any code block of README.md and docs/*.md is
parsed by the real argument parser, so a renamed command or option fails here, naming the page
and line. And the blocks a page marks ``<!-- smoke: run -->`` run for real, in order, as bash
(the demo and the multi-process walkthrough): a documented command can never crash again.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from prismesh.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_MARK = "<!-- smoke: run -->"
CONTROL = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
KEYWORDS = {"do", "then", "else", "time", "!"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)```(\w*)", lines[i])
            if m:
                start, lang, body = i + 1, m.group(2), []
                run = i > 0 and lines[i - 1].strip() == RUN_MARK
                i += 1
                while i < len(lines) and not lines[i].strip().startswith("```"):
                    body.append(lines[i])
                    i += 1
                out.append(Block(page, start + 1, lang, "\n".join(body), run))
            i += 1
    return out


def _substitute(text: str) -> str:
    """Shell expansions become placeholder words, so a line can be tokenised."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$(", i):
            depth, j = 0, i
            while j < len(text):
                depth += text[j] == "("
                depth -= text[j] == ")"
                j += 1
                if depth == 0:
                    break
            out.append("0xSUBSTITUTED")
            i = j
        else:
            out.append(text[i])
            i += 1
    text = "".join(out)
    text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}?", "1", text)  # "1": a path, a port or a count
    # redirections (`> log 2>&1`, `< in`) are not arguments
    return re.sub(r"\s\d*(>>?|<)(&\d+|\s*[^\s&|;<>]+)", " ", text)


def command_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, logical line) of shell commands in a block (continuations joined, heredoc
    bodies, comments and prompts' output skipped)."""
    if block.lang not in ("bash", "sh", "console", "text", "shell", ""):
        return []
    out, pending, first = [], "", 0
    heredoc = None
    for n, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if block.lang in ("console", "text"):
            if not line.lstrip().startswith("$ ") and not pending:
                continue
            line = line.lstrip().removeprefix("$ ")
        if not pending:
            first = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        m = re.search(r"<<-?\s*'?(\w+)'?", full)
        if m:
            heredoc = m.group(1)
        if full and not full.startswith("#"):
            out.append((block.line + first, full))
    return out


def prismesh_commands(line: str) -> list[list[str]]:
    lex = shlex.shlex(_substitute(line), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in CONTROL:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    found = []
    for seg in segments:
        while seg and (seg[0] in KEYWORDS or re.match(r"^[A-Z_]+=", seg[0])):
            seg = seg[1:]
        words = []
        skip = False
        for tok in seg:  # drop redirections and their targets
            if skip:
                skip = False
                continue
            if re.fullmatch(r"\d*[<>]+&?\d*", tok):
                skip = not re.fullmatch(r"\d*>&\d+", tok)
                continue
            words.append(tok)
        if words and Path(words[0]).name == "prismesh":
            found.append(words[1:])
    return found


DOC_COMMANDS = [
    (f"{b.page.relative_to(ROOT)}:{n}", argv)
    for b in blocks()
    for n, line in command_lines(b)
    for argv in prismesh_commands(line)
]


def test_the_docs_show_commands() -> None:
    assert len(DOC_COMMANDS) > 40
    shown = {argv[0] for _, argv in DOC_COMMANDS if argv and not argv[0].startswith("-")}
    assert {"demo", "node", "aggregator", "govern", "audit", "ipfs", "keys", "devnet"} <= shown


@pytest.mark.parametrize("where, argv", DOC_COMMANDS, ids=[w for w, _ in DOC_COMMANDS])
def test_documented_command_parses(where: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help / --version exit 0
            pytest.fail(f"{where}: `prismesh {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_run_blocks_are_bash() -> None:
    runnable = [b for b in blocks() if b.run]
    assert runnable, "no page marks a block to run"
    assert all(b.lang == "bash" for b in runnable), [b.where for b in runnable if b.lang != "bash"]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{ROOT / 'node_modules' / '.bin'}{os.pathsep}{env['PATH']}"
    env["PRISMESH_PROJECT_ROOT"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(script: str, cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_and_its_documented_follow_ups(tmp_path: Path) -> None:
    """`make demo` is `prismesh demo --out out/demo`: quiet output, a report, and a chain that
    `audit --out` and `govern status --out` re-open after the demo has exited (README blocks)."""
    env = _env(tmp_path)
    demo = subprocess.run([sys.executable, "-m", "prismesh", "demo", "--out", "out/demo"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    text = demo.stdout + demo.stderr
    assert "Loading weights" not in text and "WARNING" not in text and "Traceback" not in text, text[-3000:]
    steps = re.findall(r"^\[(\d+)/(\d+)\]", demo.stdout, re.M)
    assert [int(k) for k, _ in steps] == list(range(1, len(steps) + 1)) and {n for _, n in steps} == {str(len(steps))}
    for name in ("report.md", "report.json", "accuracy.png", "updates_pca.png"):
        assert (tmp_path / "out" / "demo" / name).is_file(), name
    readme = [b for b in blocks() if b.run and b.page.name == "README.md"]
    assert readme, "README marks no follow-up block to run"
    for b in readme:
        res = _run(b.text, tmp_path, env, timeout=600)
        assert res.returncode == 0, f"{b.where}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        assert "PASS" in res.stdout and '"COMPLETED"' in res.stdout


@pytest.mark.slow
def test_deployment_walkthrough_runs(tmp_path: Path) -> None:
    """The multi-process walkthrough of docs/deployment.md, verbatim but for its port."""
    from prismesh.chain.evm.devnet import free_port

    (block,) = [b for b in blocks() if b.run and b.page.name == "deployment.md"]
    script = block.text.replace("PORT=8545", f"PORT={free_port()}")
    env = _env(tmp_path)
    try:
        res = _run(script, tmp_path, env, timeout=1500)
        assert res.returncode == 0, f"{block.where}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert "audit of task 1: PASS" in res.stdout
    finally:
        state = tmp_path / "walkthrough" / "devnet" / "anvil-state.json"
        subprocess.run([sys.executable, "-m", "prismesh", "devnet", "--stop", "--state", str(state)],
                       env=env, capture_output=True, timeout=120)
        subprocess.run(["pkill", "-f", str(tmp_path / "walkthrough")], capture_output=True)
        shutil.rmtree(tmp_path / "walkthrough" / "state", ignore_errors=True)

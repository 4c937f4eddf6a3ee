"""Offline Solidity toolchain: one pinned solc, reproducible builds, a bridge for brownie/py-solc-x.

No native solc can be downloaded on an offline host, but the official solc-js build ships in
``node_modules/solc``. ``install_bridge()`` writes a small executable at
``~/.solcx/solc-v0.8.28`` that speaks native solc's ``--version`` / ``--standard-json``
command line over solc-js, so py-solc-x and ``brownie compile`` find "solc 0.8.28" where they
look for it. Where a native ``solc`` of the pinned version is on ``PATH`` the bridge path is a
symlink to it instead.

``compile_contracts()`` compiles ``contracts/*.sol`` with fixed settings and relative source
unit names, so the same sources give byte-identical bytecode on every machine, and caches the
result under ``build/prismesh/`` keyed by a hash of the exact compiler input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SOLC_VERSION = "0.8.28"
EVM_VERSION = "cancun"
OPTIMIZER_RUNS = 200
REMAPPINGS = ("@openzeppelin/=node_modules/@openzeppelin/",)
BRIDGE_MARKER = "prismesh-solc-bridge"
PROJECT_ROOT_ENV = "PRISMESH_PROJECT_ROOT"


def _find_project_root() -> Path:
    """The checkout holding ``contracts/``: ``$PRISMESH_PROJECT_ROOT``, else the repository this
    module lives in (an editable install), else the current directory. An installed wheel has no
    contract sources; commands that compile or start anvil then name what is missing."""
    env = os.environ.get(PROJECT_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "contracts").is_dir():
        return here
    return Path.cwd()


REPO_ROOT = _find_project_root()
ARTIFACT_DIR_NAME = "build/prismesh"

# Compiler settings are part of the cache key and of the metadata hash in the bytecode:
# change them only together with the pinned version above.
SETTINGS: dict[str, Any] = {
    "evmVersion": EVM_VERSION,
    "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
    "remappings": list(REMAPPINGS),
    "metadata": {"bytecodeHash": "ipfs"},
    "outputSelection": {
        "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]},
    },
}


class ToolchainError(RuntimeError):
    """The compiler could not be found, installed or run, or the sources did not compile."""


# Raised when the bridge's own code changes, so installed bridges are rewritten.
BRIDGE_REVISION = "bridge-r2"
# The bridge's first comment: what install_bridge looks for to call an installed bridge current.
_BRIDGE_HEADER = f"{BRIDGE_MARKER} {SOLC_VERSION} ({BRIDGE_REVISION})"

_BRIDGE_JS = r"""#!__NODE__
// __HEADER__: solc's --version / --standard-json command line over solc-js.
// Written by `python -m prismesh.chain.evm.toolchain install-bridge`; regenerate rather than edit.
"use strict";
const fs = require("fs");
const path = require("path");
const SOLC_MODULE = __SOLC_MODULE__;
const LONG_VERSION = __LONG_VERSION__;

function parseArgs(argv) {
  const opts = { standardJson: false, version: false, basePath: null, includePaths: [], allowPaths: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const takeValue = () => {
      const eq = a.indexOf("=");
      if (eq >= 0) return a.slice(eq + 1);
      i += 1;
      return argv[i];
    };
    if (a === "--version" || a === "-v") opts.version = true;
    else if (a === "--standard-json") opts.standardJson = true;
    else if (a.startsWith("--base-path")) opts.basePath = takeValue();
    else if (a.startsWith("--include-path")) opts.includePaths.push(takeValue());
    else if (a.startsWith("--allow-paths")) opts.allowPaths.push(...String(takeValue()).split(",").filter(Boolean));
    // Any other flag is accepted and ignored: it cannot change a standard-json compile.
  }
  return opts;
}

function isInside(file, dir) {
  const rel = path.relative(dir, file);
  return rel === "" || (!rel.startsWith("..") && !path.isAbsolute(rel));
}

function makeImportCallback(opts) {
  const base = path.resolve(opts.basePath || process.cwd());
  const roots = [base, ...opts.includePaths.map((p) => path.resolve(p))];
  const allowed = [...roots, ...opts.allowPaths.map((p) => path.resolve(p))];
  return function findImports(unitName) {
    const candidates = path.isAbsolute(unitName) ? [unitName] : roots.map((r) => path.resolve(r, unitName));
    for (const file of candidates) {
      let real;
      try { real = fs.realpathSync(file); } catch (e) { continue; }
      if (!allowed.some((d) => isInside(file, d) || isInside(real, d))) {
        return { error: "File outside of allowed directories: " + unitName };
      }
      try { return { contents: fs.readFileSync(real, "utf8") }; } catch (e) { return { error: String(e) }; }
    }
    return { error: "File not found: " + unitName + " (searched " + roots.join(", ") + ")" };
  };
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.version) {
    process.stdout.write("solc, the solidity compiler commandline interface\nVersion: " + LONG_VERSION + "\n");
    return 0;
  }
  if (!opts.standardJson) {
    process.stderr.write("This solc is a solc-js bridge: only --version and --standard-json are supported\n");
    return 1;
  }
  const input = fs.readFileSync(0, "utf8");
  let solc;
  try {
    solc = require(SOLC_MODULE);
  } catch (e) {
    // Answered as solc answers a failed compile, so brownie and py-solc-x show the reason.
    const message = "solc-js is not at " + SOLC_MODULE + " (this bridge was installed from a checkout that " +
      "has moved or gone): run `python -m prismesh.chain.evm.toolchain install-bridge` in the checkout you compile from";
    process.stdout.write(JSON.stringify({ errors: [{ severity: "error", type: "BridgeError", component: "general",
      message: message, formattedMessage: message }] }));
    return 0;
  }
  const output = solc.compile(input, { import: makeImportCallback(opts) });
  process.stdout.write(output);
  return 0;
}

process.exitCode = main();
"""


def repo_root() -> Path:
    """The project root (where ``contracts/`` and ``node_modules/`` live)."""
    return REPO_ROOT


def solcjs_module(root: Path | None = None) -> Path:
    """Path to the pinned solc-js package; raises if it is missing or the wrong version."""
    module = (root or REPO_ROOT) / "node_modules" / "solc"
    pkg = module / "package.json"
    if not pkg.is_file():
        raise ToolchainError(f"solc-js not found at {module}; run `npm ci` (make setup)")
    version = json.loads(pkg.read_text())["version"]
    if version != SOLC_VERSION:
        raise ToolchainError(f"{module} is solc-js {version}, expected {SOLC_VERSION}")
    return module


def node_executable() -> str:
    """The ``node`` binary used to run solc-js."""
    node = shutil.which("node")
    if node is None:
        raise ToolchainError("node is not on PATH; it is needed to run solc-js")
    return node


def _version_of(binary: str) -> str | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def find_native_solc() -> Path | None:
    """A native ``solc`` of the pinned version on PATH (not our bridge), or None."""
    found = shutil.which("solc")
    if found is None:
        return None
    path = Path(found).resolve()
    try:
        with path.open("rb") as fh:
            if BRIDGE_MARKER.encode() in fh.read(512):
                return None
    except OSError:
        return None
    version = _version_of(str(path))
    if version is None or not version.startswith(SOLC_VERSION + "+"):
        return None
    return path


def bridge_path() -> Path:
    """Where py-solc-x and brownie look for solc ``SOLC_VERSION`` (``~/.solcx/solc-v<ver>``)."""
    env = os.environ.get("SOLCX_BINARY_PATH")
    folder = Path(env) if env else Path.home() / ".solcx"
    return folder / f"solc-v{SOLC_VERSION}"


def _solcjs_long_version(module: Path) -> str:
    out = subprocess.run(
        [
            node_executable(),
            "-e",
            f"process.stdout.write(require({json.dumps(str(module))}).version())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.startswith(SOLC_VERSION + "+"):
        raise ToolchainError(f"could not load solc-js from {module}: {out.stderr.strip()}")
    return out.stdout.strip()


def _bridge_source(module: Path, long_version: str) -> str:
    return (
        _BRIDGE_JS.replace("__NODE__", node_executable())
        .replace("__HEADER__", _BRIDGE_HEADER)
        .replace("__SOLC_MODULE__", json.dumps(str(module)))
        .replace("__LONG_VERSION__", json.dumps(long_version))
    )


def _write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_bridge(force: bool = False) -> Path:
    """Install ``~/.solcx/solc-v<ver>``: a symlink to a native solc if one is on PATH, else the
    solc-js bridge. Idempotent and fast when it is already current (no compiler is loaded)."""
    target = bridge_path()
    native = find_native_solc()
    if native is not None:
        if not force and target.is_symlink() and target.resolve() == native:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(native)
        os.replace(tmp, target)
        return target

    module = solcjs_module()
    if not force and target.is_file() and not target.is_symlink():
        current = target.read_text(errors="replace")
        # Current if written by this code for this solc-js location and node binary.
        if (
            _BRIDGE_HEADER in current
            and json.dumps(str(module)) in current
            and current.startswith(f"#!{node_executable()}\n")
        ):
            return target
    source = _bridge_source(module, _solcjs_long_version(module))
    if target.is_symlink():
        target.unlink()
    _write_atomic(target, source, mode=0o755)
    return target


def solc_executable() -> Path:
    """The solc to run: a native pinned solc on PATH, else the (installed on demand) bridge."""
    native = find_native_solc()
    return native if native is not None else install_bridge()


def run_standard_json(
    input_json: dict[str, Any],
    base_path: Path | None = None,
    allow_paths: list[Path] | None = None,
) -> dict[str, Any]:
    """Run ``solc --standard-json`` on ``input_json``; raise ``ToolchainError`` on any error."""
    cmd = [str(solc_executable()), "--standard-json"]
    if base_path is not None:
        cmd += ["--base-path", str(base_path)]
    if allow_paths:
        cmd += ["--allow-paths", ",".join(str(p) for p in allow_paths)]
    proc = subprocess.run(
        cmd,
        input=json.dumps(input_json),
        capture_output=True,
        text=True,
        cwd=str(base_path) if base_path is not None else None,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise ToolchainError(f"solc failed ({proc.returncode}): {proc.stderr.strip()}")
    try:
        output = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ToolchainError(f"solc printed no JSON: {proc.stdout[:500]!r}") from exc
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        text = "\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors)
        raise ToolchainError(f"compilation failed:\n{text}")
    return output


def contract_sources(root: Path | None = None) -> dict[str, str]:
    """``{relative path: content}`` of every ``contracts/**/*.sol``, sorted."""
    base = root or REPO_ROOT
    files = sorted((base / "contracts").rglob("*.sol"))
    if not files:
        raise ToolchainError(f"no Solidity sources under {base / 'contracts'}")
    return {f.relative_to(base).as_posix(): f.read_text() for f in files}


def standard_input(sources: dict[str, str]) -> dict[str, Any]:
    """The exact compiler input for ``sources`` (content inlined, relative unit names)."""
    return {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sorted(sources.items())},
        "settings": json.loads(json.dumps(SETTINGS)),
    }


def _openzeppelin_fingerprint(root: Path) -> str:
    pkg = root / "node_modules" / "@openzeppelin" / "contracts" / "package.json"
    return json.loads(pkg.read_text())["version"] if pkg.is_file() else "missing"


def compile_key(input_json: dict[str, Any], root: Path | None = None) -> str:
    """Cache key: the compiler version, the full input and the imported library version."""
    payload = json.dumps(
        {
            "solc": SOLC_VERSION,
            "input": input_json,
            "openzeppelin": _openzeppelin_fingerprint(root or REPO_ROOT),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def compile_contracts(
    root: Path | None = None, use_cache: bool = True
) -> dict[str, dict[str, Any]]:
    """Compile the project's contracts: ``{name: {"abi", "bytecode", "deployedBytecode",
    "source"}}``. Cached under ``build/prismesh/<key>.json``; the key hashes sources + settings."""
    base = (root or REPO_ROOT).resolve()
    input_json = standard_input(contract_sources(base))
    key = compile_key(input_json, base)
    cache_dir = base / ARTIFACT_DIR_NAME
    cache_file = cache_dir / f"artifacts-{key[:16]}.json"
    if use_cache and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return cached["contracts"]
        except (json.JSONDecodeError, KeyError):
            pass
    output = run_standard_json(input_json, base_path=base, allow_paths=[base])
    contracts: dict[str, dict[str, Any]] = {}
    for unit in sorted(input_json["sources"]):
        for name, data in sorted(output.get("contracts", {}).get(unit, {}).items()):
            bytecode = data["evm"]["bytecode"]["object"]
            if name in contracts:
                raise ToolchainError(f"contract name {name} is defined twice ({unit})")
            contracts[name] = {
                "abi": data["abi"],
                "bytecode": "0x" + bytecode,
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
                "source": unit,
            }
    _write_atomic(
        cache_file,
        json.dumps({"key": key, "solc": SOLC_VERSION, "contracts": contracts}, sort_keys=True),
    )
    return contracts


def canonical_abi(abi: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ABI as solc emits it, entries sorted: tools add fields (brownie names the
    constructor "constructor"), which must not change what a manifest records."""
    out = []
    for entry in abi:
        e = dict(entry)
        if e.get("type") in ("constructor", "fallback", "receive"):
            e.pop("name", None)
        out.append(e)
    return sorted(out, key=lambda e: json.dumps(e, sort_keys=True, separators=(",", ":")))


def abi_hash(abi: list[dict[str, Any]]) -> str:
    """sha256 of the canonical ABI, so ABIs from different tools' JSON compare equal."""
    text = json.dumps(canonical_abi(abi), sort_keys=True, separators=(",", ":"))
    return "0x" + hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prismesh.chain.evm.toolchain", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install-bridge", help=f"install ~/.solcx/solc-v{SOLC_VERSION}")
    inst.add_argument("--force", action="store_true", help="rewrite even when current")
    sub.add_parser("compile", help="compile contracts/ and print the artifact summary")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install-bridge":
            path = install_bridge(force=args.force)
            kind = "native solc" if path.is_symlink() else "solc-js bridge"
            print(f"solc {SOLC_VERSION}: {path} ({kind})")
        else:
            for name, art in compile_contracts().items():
                code = bytes.fromhex(art["bytecode"][2:])
                print(f"{name:24s} {len(code):6d} bytes  {hashlib.sha256(code).hexdigest()[:16]}")
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

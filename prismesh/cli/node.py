"""``prismesh learn ...``: the learning half of a client node from the command line.

    prismesh learn base-model              build (once) the offline stand-in base model
    prismesh learn benchmark --out DIR     write the synthetic three-client benchmark
    prismesh learn train ...               one local LoRA round on a JSONL file
    prismesh learn evaluate ...            accuracy of a base model (+ adapter) on JSONL files
    prismesh learn matrix --out DIR        paper Table 2 on the benchmark (JSON + Markdown)

Heavy imports (torch, transformers, peft) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prismesh.cli.errors import UsageError
from prismesh.cli.output import add_daemon_output_arguments


def register(subparsers) -> None:
    d = subparsers.add_parser(
        "node",
        help="run the client node daemon (one per GPU host), or check its set-up",
        description="`prismesh node --config FILE` runs the daemon; `prismesh node check --config "
        "FILE` verifies the set-up first (config, keystore, chain, gas, registration, model, data, storage).",
    )
    d.add_argument("--config", type=Path, default=None, help="node TOML/JSON config")
    d.add_argument("--once", action="store_true", help="register, handle what is final now, then exit")
    d.add_argument("-q", "--quiet", action="store_true", help="no training progress bars")
    d.add_argument("-v", "--verbose", action="store_true", help="keep the libraries' own progress bars and warnings")
    add_daemon_output_arguments(d)
    d.set_defaults(func=cmd_node)
    dsub = d.add_subparsers(dest="node_command", metavar="[check]")
    c = dsub.add_parser("check", help="verify everything the node needs before its first transaction")
    c.add_argument("--config", type=Path, required=True, help="node TOML/JSON config")
    c.add_argument("--no-model-hash", action="store_true", help="skip hashing the model files (large models)")
    c.set_defaults(func=cmd_node_check)

    learn = subparsers.add_parser("learn", help="local LoRA training and evaluation (no chain)")
    sub = learn.add_subparsers(dest="learn_command", metavar="LEARN_COMMAND")
    sub.required = True

    p = sub.add_parser("base-model", help="build or locate the offline stand-in base model")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $PRISMESH_HOME/models")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_base_model)

    p = sub.add_parser("benchmark", help="write the synthetic non-IID three-client benchmark")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("train", help="train a LoRA adapter on one client's JSONL file")
    p.add_argument("--base-model", default="auto", help="HF model directory, or 'auto' for the stand-in")
    p.add_argument("--data", type=Path, required=True, help="MedQA or MedMCQA JSONL")
    p.add_argument("--fmt", choices=("medqa", "medmcqa"), default=None)
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction (deterministic split) and train on the rest")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    p.add_argument("--init-adapter", type=Path, default=None, help="start from this PEFT adapter")
    p.add_argument("--config", type=Path, default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig field (JSON value), repeatable")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="option log-likelihood accuracy on JSONL test files")
    p.add_argument("--base-model", default="auto")
    p.add_argument("--adapter", type=Path, default=None)
    p.add_argument("--data", nargs="+", required=True, metavar="[NAME=]FILE",
                   help="test files; each is named NAME, else by its folder and file name where "
                   "file names repeat (out/bench/medqa-en/test.jsonl -> medqa-en)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scoring", choices=("letter", "mean", "sum"), default=None,
                   help="letter (the MedQA standard; default for a --base-model directory), mean "
                        "(length-normalised; default for the stand-in) or sum")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("matrix", help="cross-dataset matrix (paper Table 2) as JSON + Markdown")
    p.add_argument("--base-model", default="auto")
    p.add_argument("--benchmark", type=Path, default=None,
                   help="benchmark directory (default: generate one under --out)")
    p.add_argument("--seed", type=int, default=0, help="benchmark and training seed")
    p.add_argument("--row", action="append", default=[], metavar="LABEL=ADAPTER",
                   help="a row to evaluate; without any, one single-client LoRA per client is trained")
    p.add_argument("--epochs", type=int, default=1, help="local epochs of the trained single-client rows")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--scoring", choices=("letter", "mean", "sum"), default=None,
                   help="as for evaluate (default: mean for the stand-in, letter otherwise)")
    p.set_defaults(func=cmd_matrix)


def _base(arg: str, progress: bool = True) -> Path:
    from prismesh.node.basemodel import ensure_base_model

    if arg == "auto":
        return ensure_base_model(progress=progress)
    path = Path(arg)
    if not (path / "config.json").is_file():
        raise UsageError(f"--base-model {arg}: not a Hugging Face model directory (no config.json)")
    return path


def _scoring(args: argparse.Namespace) -> str:
    """The stand-in cannot point at option letters (docs/learning.md): it is scored by mean."""
    from prismesh.node.synthetic import BENCHMARK_SCORING

    return args.scoring or (BENCHMARK_SCORING if args.base_model == "auto" else "letter")


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_base_model(args: argparse.Namespace) -> int:
    from prismesh.chain.taskspec import model_fingerprint
    from prismesh.node.basemodel import ensure_base_model

    path = ensure_base_model(args.cache_dir, seed=args.seed, progress=True)
    print(json.dumps({"path": str(path), "sha256": model_fingerprint(path)}, indent=2))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from prismesh.node.synthetic import make_benchmark

    specs = make_benchmark(args.out, seed=args.seed, scale=args.scale)
    print(json.dumps([s.to_dict() for s in specs], indent=2, ensure_ascii=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from prismesh.node.data import load_jsonl, train_test_split
    from prismesh.node.trainer import TrainConfig, TrainConfigError, train_lora

    examples = load_jsonl(args.data, args.fmt)
    try:
        raw = json.loads(args.config.read_text()) if args.config else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {args.config} is not JSON: {exc}") from None
    try:
        config = TrainConfig.from_dict({**raw, **_parse_overrides(args.set)})
    except TrainConfigError as exc:
        raise UsageError(f"training config: {exc}") from None
    if args.test_fraction > 0:
        examples, _ = train_test_split(examples, args.test_fraction, args.split_seed)
    result = train_lora(_base(args.base_model), examples, args.out, config,
                        init_adapter=args.init_adapter, progress=not args.no_progress)
    print(json.dumps({"adapter_dir": str(result.adapter_dir), "num_samples": result.num_samples,
                      "metrics": result.metrics}, indent=2))
    return 0


def _named_files(items: list[str], what: str = "--data") -> dict[str, Path]:
    """``NAME=FILE`` entries, or files named after themselves: by file name when those are all
    different, else by folder (``.../medqa-en/test.jsonl`` -> ``medqa-en``). Two entries that
    would share a name are refused rather than merged."""
    named: list[tuple[str | None, Path]] = []
    for item in items:
        name, sep, path = str(item).partition("=")
        if sep and name and "/" not in name:
            named.append((name, Path(path)))
        else:
            named.append((None, Path(item)))
    stems = [p.stem for n, p in named if n is None]
    by_folder = len(set(stems)) < len(stems)
    out: dict[str, Path] = {}
    for name, path in named:
        if name is None:
            name = path.parent.name if by_folder and path.parent.name else path.stem
        if name in out:
            raise UsageError(f"{what}: two entries are both named {name!r} ({out[name]} and {path}); name them with NAME=FILE")
        out[name] = path
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, fairness

    test_sets = {name: load_jsonl(path) for name, path in _named_files(args.data).items()}
    ev = Evaluator(_base(args.base_model), scoring=_scoring(args))
    acc = ev.accuracies(args.adapter, test_sets, args.batch_size)
    print(json.dumps({"accuracy": acc, **fairness(acc), "scoring": ev.scoring}, indent=2))
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from prismesh.node.data import load_jsonl
    from prismesh.node.evaluate import Evaluator, cross_dataset_matrix, render_markdown
    from prismesh.node.synthetic import BENCHMARK_TRAIN_CONFIG, make_benchmark
    from prismesh.node.trainer import TrainConfig, train_lora

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = _base(args.base_model, progress=not args.no_progress)
    bench = args.benchmark or out / "benchmark"
    manifest = bench / "benchmark.json"
    if not manifest.is_file():
        make_benchmark(bench, seed=args.seed)
    clients = json.loads(manifest.read_text())["clients"]
    tests = {c["name"]: load_jsonl(Path(c["test_path"])) for c in clients}

    rows: dict[str, Path | None] = {"Base model": None}
    summary: dict = {}
    if args.row:
        rows.update(_named_files(args.row, "--row"))
    else:
        config = TrainConfig.from_dict({**BENCHMARK_TRAIN_CONFIG, "seed": args.seed, "epochs": args.epochs})
        for c in clients:
            res = train_lora(base, load_jsonl(Path(c["train_path"])), out / "adapters" / c["name"],
                             config, progress=not args.no_progress)
            rows[f"+ LoRA ({c['name']})"] = res.adapter_dir
            summary[c["name"]] = {"num_samples": res.num_samples, **res.metrics}
    matrix = cross_dataset_matrix(Evaluator(base, scoring=_scoring(args)), rows, tests)
    matrix["scoring"] = _scoring(args)
    matrix["training"] = summary
    (out / "matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    md = render_markdown(matrix, title="Cross-dataset accuracy (%)")
    (out / "matrix.md").write_text(md)
    print(md)
    return 0


def cmd_node_check(args: argparse.Namespace) -> int:
    from prismesh.cli.output import configure_output

    configure_output(False)
    from prismesh.node.check import render, run_checks

    checks = run_checks(args.config, hash_model=not args.no_model_hash)
    print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_node(args) -> int:
    from prismesh.cli.errors import CommandError
    from prismesh.cli.output import daemon_output
    from prismesh.node.daemon import DUPLICATE_IDENTITY_EXIT, DuplicateIdentity, run_node

    if args.config is None:
        raise UsageError("--config FILE is required (the node's TOML/JSON config)")
    daemon_output(args)
    try:
        return run_node(args.config, once=args.once, progress=not args.quiet, metrics_port=args.metrics_port,
                        metrics_host=args.metrics_host)
    except DuplicateIdentity as exc:
        raise CommandError(str(exc), code=DUPLICATE_IDENTITY_EXIT) from None

"""``prismesh ipfs ...``: add, get, cat, stat, pin and verify, with Kubo's flags and output.

``--store`` picks the backend (``embedded`` by default, ``embedded:/path``, ``kubo``,
``kubo:/ip4/127.0.0.1/tcp/5001``, ``kubo:http://host:port``); ``PRISMESH_IPFS`` sets the default.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from prismesh.cli.errors import CommandError, UsageError


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    ipfs = subparsers.add_parser(
        "ipfs", help="content-addressed storage (Kubo-compatible CIDs, verified reads)"
    )
    ipfs.add_argument(
        "--store",
        default=None,
        help="embedded (default), embedded:/path, kubo, kubo:/ip4/HOST/tcp/PORT, kubo:http://HOST:PORT",
    )
    sub = ipfs.add_subparsers(dest="ipfs_command", metavar="COMMAND")
    sub.required = True

    add = sub.add_parser(
        "add", help="add a file or directory (standard input without PATH); print its CID as Kubo does"
    )
    add.add_argument("path", metavar="PATH", nargs="?", help="file or directory (default: standard input)")
    add.add_argument("-r", "--recursive", action="store_true", help="add directories recursively")
    add.add_argument(
        "-n", "--only-hash", action="store_true", help="only compute the CID, store nothing"
    )
    add.add_argument("--cid-version", type=int, choices=(0, 1), default=0)
    add.add_argument(
        "--raw-leaves",
        nargs="?",
        const="true",
        default=None,
        metavar="BOOL",
        help="raw leaf blocks, --raw-leaves or --raw-leaves=false "
        "(default: true with --cid-version 1, false with 0)",
    )
    add.add_argument(
        "-w", "--wrap-with-directory", action="store_true",
        help="wrap the added file in a directory that names it; print that directory's CID last",
    )
    add.add_argument("-q", "--quiet", action="store_true", help="print only CIDs")
    add.add_argument("-Q", "--quieter", action="store_true", help="print only the root CID")
    add.add_argument("--pin", type=_bool, default=True, metavar="BOOL", help="pin the root (true)")
    add.set_defaults(func=cmd_add)

    get = sub.add_parser("get", help="fetch a CID to a path, verifying every block")
    get.add_argument("cid", metavar="CID")
    get.add_argument("-o", "--output", default=None, metavar="PATH", help="destination (default ./CID)")
    get.set_defaults(func=cmd_get)

    cat = sub.add_parser("cat", help="write a file's bytes to stdout, verifying every block")
    cat.add_argument("cid", metavar="CID")
    cat.set_defaults(func=cmd_cat)

    stat = sub.add_parser("stat", help="type, size and cumulative size of a CID")
    stat.add_argument("cid", metavar="CID")
    stat.set_defaults(func=cmd_stat)

    verify = sub.add_parser(
        "verify", help="re-hash every block of a DAG (or of the whole embedded store with --all)",
        description="Read every block under CID and check it against its hash, listing each "
        "damaged or missing block. --repair drops the damaged ones so that adding the object "
        "again (prismesh ipfs add, or a daemon that holds its bytes) writes them afresh.",
    )
    verify.add_argument("cid", metavar="CID", nargs="?", help="root of the DAG to check")
    verify.add_argument("--all", action="store_true", help="every block of an embedded store")
    verify.add_argument("--repair", action="store_true", help="drop damaged blocks")
    verify.set_defaults(func=cmd_verify)

    spec = sub.add_parser(
        "add-spec", help="add a task spec's canonical bytes (the CID a task carries on chain)",
        description="Add the canonical bytes of a task spec JSON file, exactly what "
        "`prismesh govern create-task` pins, so a lost or damaged spec is restored under the "
        "same CID (a plain `ipfs add` of the pretty-printed file gives another one).",
    )
    spec.add_argument("spec", type=Path, metavar="SPEC", help="task spec JSON (see govern make-spec)")
    spec.add_argument("-n", "--only-hash", action="store_true", help="only compute the CID")
    spec.set_defaults(func=cmd_add_spec)

    pin = sub.add_parser("pin", help="pin add | rm | ls")
    pin_sub = pin.add_subparsers(dest="pin_command", metavar="COMMAND")
    pin_sub.required = True
    pin_add = pin_sub.add_parser("add", help="pin a CID recursively")
    pin_add.add_argument("cid", metavar="CID")
    pin_add.set_defaults(func=cmd_pin_add)
    pin_rm = pin_sub.add_parser("rm", help="remove a pin")
    pin_rm.add_argument("cid", metavar="CID")
    pin_rm.set_defaults(func=cmd_pin_rm)
    pin_ls = pin_sub.add_parser("ls", help="list pinned roots")
    pin_ls.add_argument("-q", "--quiet", action="store_true", help="print only CIDs")
    pin_ls.set_defaults(func=cmd_pin_ls)


def _store(args: argparse.Namespace):
    from prismesh.chain.storage import open_store

    try:
        return open_store(args.store)
    except ValueError as exc:
        raise UsageError(f"--store: {exc}") from None


def cmd_add(args: argparse.Namespace) -> int:
    raw_leaves: bool | None = None
    if args.raw_leaves is not None:
        try:
            raw_leaves = _bool(args.raw_leaves)
        except argparse.ArgumentTypeError:
            if args.path is not None:
                raise UsageError(f"--raw-leaves takes true or false, got {args.raw_leaves!r}") from None
            # `--raw-leaves PATH`: the flag form, as in Kubo, followed by the path
            raw_leaves, args.path = True, args.raw_leaves
    if args.path is None:
        return _add_stdin(args, raw_leaves)
    path = Path(args.path)
    if path.is_dir() and not path.is_symlink() and not args.recursive:
        raise UsageError(f"{path} is a directory, use the '-r' flag to specify directories")
    lines: list[tuple[str, str]] = []
    root = _add(args, path, raw_leaves, args.wrap_with_directory, args.pin,
                None if args.quieter else lambda name, cid: lines.append((name, cid)))
    _print_added(args, root, lines)
    return 0


def _add(args: argparse.Namespace, path: Path, raw_leaves: bool | None, wrap: bool, pin: bool,
         on_added=None) -> str:
    return _store(args).add_path(
        path, cid_version=args.cid_version, raw_leaves=raw_leaves, only_hash=args.only_hash,
        pin=pin, on_added=on_added, wrap_with_directory=wrap,
    )


def _add_stdin(args: argparse.Namespace, raw_leaves: bool | None) -> int:
    """``... | prismesh ipfs add``: Kubo names a piped file by its own CID."""
    if sys.stdin.isatty():
        raise UsageError("no PATH given and standard input is a terminal: pipe data in or name a file")
    with tempfile.TemporaryDirectory(prefix="prismesh-stdin-") as tmp:
        path = Path(tmp) / "stdin"
        with path.open("wb") as fh:
            shutil.copyfileobj(sys.stdin.buffer, fh, 1 << 20)
        cid = _add(args, path, raw_leaves, False, args.pin and not args.wrap_with_directory)
        lines, root = [(cid, cid)], cid
        if args.wrap_with_directory:
            named = Path(tmp) / "named"
            named.mkdir()
            path.rename(named / cid)
            root = _add(args, named / cid, raw_leaves, True, args.pin)
            lines.append(("", root))
    _print_added(args, root, lines)
    return 0


def _print_added(args: argparse.Namespace, root: str, lines: list[tuple[str, str]]) -> None:
    if args.quieter:
        print(root)
        return
    for name, cid in lines:
        print(cid if args.quiet else f"added {cid} {name}".rstrip())


def cmd_get(args: argparse.Namespace) -> int:
    from prismesh.chain.storage import normalize_cid

    dest = Path(args.output) if args.output else Path(normalize_cid(args.cid))
    if dest.exists():
        raise CommandError(f"{dest} already exists; remove it or choose another path with -o")
    print(f"Saving file(s) to {dest}")
    _store(args).get(args.cid, dest)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for piece in _store(args).iter_file(args.cid):
        out.write(piece)
    out.flush()
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    info = _store(args).stat(args.cid)
    print(info.cid)
    print(f"Size: {info.size}")
    print(f"CumulativeSize: {info.cumulative_size}")
    print(f"ChildBlocks: {info.links}")
    print(f"Type: {info.type}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from prismesh.chain.storage import EmbeddedStore

    if (args.cid is None) == (not args.all):
        raise UsageError("name a CID to check, or --all for every block of an embedded store")
    store = _store(args)
    if args.all:
        if not isinstance(store, EmbeddedStore):
            raise UsageError("--all checks an embedded store; for Kubo run `ipfs repo verify`")
        checked, damaged = store.check_all(repair=args.repair)
        for path in damaged:
            print(f"{'removed' if args.repair else 'damaged'} {path}")
        if damaged and not args.repair:
            raise CommandError(f"{len(damaged)} of {checked} blocks are damaged; --repair drops them")
        print(f"checked {checked} blocks: {len(damaged)} damaged" + (" (removed)" if damaged else ""))
        return 0
    report = store.check(args.cid, repair=args.repair)
    for name in report.damaged:
        print(f"{'removed' if name in report.removed else 'damaged'} {name}")
    for name in report.missing:
        print(f"missing {name}")
    if report.ok:
        print(f"verified {args.cid}: {report.checked} blocks ok")
        return 0
    bad = report.damaged + report.missing
    what = (f"{len(report.damaged)} damaged and {len(report.missing)} missing block(s) "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    hint = ("removed the damaged ones; add the object again to restore it" if report.removed
            else "--repair drops damaged blocks so that adding the object again restores them")
    raise CommandError(f"{report.cid}: {what}; {hint}")


def cmd_add_spec(args: argparse.Namespace) -> int:
    from prismesh.chain.taskspec import TaskSpec

    if not args.spec.is_file():
        raise CommandError(f"{args.spec}: no such file")
    spec = TaskSpec.from_bytes(args.spec.read_bytes(), where=str(args.spec))
    print(_store(args).add_bytes(spec.to_bytes(), only_hash=args.only_hash))
    return 0


def cmd_pin_add(args: argparse.Namespace) -> int:
    from prismesh.chain.storage import normalize_cid

    _store(args).pin(args.cid)
    print(f"pinned {normalize_cid(args.cid)} recursively")
    return 0


def cmd_pin_rm(args: argparse.Namespace) -> int:
    from prismesh.chain.storage import normalize_cid

    _store(args).unpin(args.cid)
    print(f"unpinned {normalize_cid(args.cid)}")
    return 0


def cmd_pin_ls(args: argparse.Namespace) -> int:
    pins = _store(args).pins()
    for cid, kind in sorted(pins.items()):
        print(cid if args.quiet else f"{cid} {kind}")
    return 0

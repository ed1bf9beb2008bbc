"""The `walrep` command line: one sub-command per job, each in a small function.

Exit statuses: 0 success, 1 usage or I/O error, 2 a config, flag value or WAL
directory that cannot work as given (a node that cannot start), 3 (dump) damage
found in a log. verify and check-history keep their own (see their --help).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from walrep import node
from walrep.node import format as fmt

from . import config as configmod
from . import history, startup

EXIT_OK = 0
EXIT_ERROR = 1
# Retrying as is cannot help (the reader's systemd unit does not restart on it): a bad
# config, a WAL directory the node cannot use, a port held by another process, an ack
# level that does not exist.
EXIT_INVALID = 2
EXIT_DAMAGED = 3


def _json_default(value: Any) -> Any:
    # msgpack "bin" values have no JSON type; base64 keeps them lossless.
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def entry_as_json(entry: node.Entry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seq": entry.seq,
        "timestamp_us": entry.timestamp_us,
        "size": len(entry.payload),
        "crc32": entry.crc32,
        "database": entry.database,
        "kind": entry.kind,
    }
    if entry.kind == "records":
        out["records"] = entry.records
    elif entry.kind == "columnar":
        out["measurement"] = entry.columnar.measurement
        out["columns"] = entry.columnar.columns
    return out


def _entry_as_text(entry: node.Entry) -> str:
    when = datetime.datetime.fromtimestamp(entry.timestamp_us / 1e6, datetime.UTC)
    seq = "-" if entry.seq is None else str(entry.seq)
    head = (
        f"seq={seq} time={when.isoformat(timespec='microseconds')} size={len(entry.payload)} "
        f"crc32={entry.crc32:08x} db={entry.database or '-'} kind={entry.kind}"
    )
    if entry.kind == "records":
        body = json.dumps(entry.records, default=_json_default, ensure_ascii=False)
        return f"{head} records={body}"
    if entry.kind == "columnar":
        cols = json.dumps(entry.columnar.columns, default=_json_default, ensure_ascii=False)
        return f"{head} measurement={entry.columnar.measurement} columns={cols}"
    return head


def cmd_dump(args: argparse.Namespace) -> int:
    path = args.path
    if not os.path.exists(path):
        print(f"walrep dump: {path}: no such file or directory", file=sys.stderr)
        return EXIT_ERROR
    problems: list[fmt.Problem] = []

    def report(problem: fmt.Problem) -> None:
        problems.append(problem)
        print(f"walrep dump: {problem}", file=sys.stderr)

    reader = node.WALReader(path, on_problem=report)
    if args.from_seq is None and args.to_seq is None:
        entries = reader.all_entries()
    else:
        entries = reader.entries(args.from_seq or 1, args.to_seq)
    out = sys.stdout
    from .progress import Progress

    # Progress on stderr only when both are terminals' business: not into a pipe's data.
    progress = Progress("dump", total=reader.bounds()[1] if os.path.isdir(path) else None)
    if out.isatty():
        progress.enabled = False  # the entries themselves are on the terminal
    try:
        for count, entry in enumerate(entries):
            if count % 10_000 == 0 and entry.seq is not None:
                progress.update(entry.seq)
            if args.json:
                line = json.dumps(entry_as_json(entry), default=_json_default, ensure_ascii=False)
            else:
                line = _entry_as_text(entry)
            out.write(line + "\n")
    except OSError as exc:
        print(f"walrep dump: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        progress.done()
    return EXIT_DAMAGED if problems else EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; walrep's commands document 1 (verify keeps 2)."""

    usage_exit_status = EXIT_ERROR

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit_status, f"{self.prog}: error: {message}\n")


# The help line of each config key's flag (README, "Running a cluster", says more);
# _ROLE_HELP holds the keys whose meaning differs by role. A key with no line here
# fails tests/unit/test_cli_help.py.
_KEY_HELP = {
    "wal_dir": "directory of this node's WAL (required)",
    "sync_mode": "how a commit reaches the disk: fsync, fdatasync or async",
    "writer_thread": "commit on a writer thread instead of in the event loop: slower "
    "commits, but a disk that stalls then stalls only the commits",
    "buffer_entries": "the WAL's in-memory queue, in entries; when it is full, clients wait",
    "max_segment_bytes": "segment rotation size, in bytes",
    "metrics": "HOST:PORT to serve Prometheus metrics on (default: off)",
    "log_json": "log JSON lines instead of key=value text",
    "log_level": "debug, info, warning or error",
    "insecure": "bind addresses other than loopback without CURVE keys (unencrypted)",
    # Leader keys.
    "ingest": "clients append here (ROUTER)",
    "publish": "the live stream to readers (PUB)",
    "default_ack": "ack level of appends that name none: " + configmod.ACK_LEVELS_HELP,
    "publish_hwm": "messages queued per subscriber before the PUB drops them (readers then fetch)",
    "max_subscribers": "connections the publish socket takes at once; more are refused",
    "max_retained_bytes": "purge older segments past this many retained bytes even if a "
    "reader needs them (0: no bound)",
    "max_retained_age_s": "purge segments last written this many seconds ago even if a "
    "reader needs them (0: no bound)",
    "purge_without_readers": "with no reader known, purge replicated segments anyway "
    "(default: keep them all)",
    "allow_readers": "public keys readers may connect with: a .pub file or a directory",
    "allow_clients": "public keys clients may append with: a .pub file or a directory",
    # Reader keys.
    "leader_publish": "the leader's publish endpoint",
    "leader_control": "the leader's control endpoint",
    "receive_hwm": "messages the SUB socket queues before dropping them (gaps are fetched)",
    "anti_entropy_interval_s": "seconds between background comparisons with the leader's "
    "log (0: off)",
    "leader_key": "the leader's public key file (.pub)",
    "resync": "discard this reader's log and start again from the leader's earliest entry",
}
_ROLE_HELP = {
    configmod.LeaderConfig: {
        "id": "the leader's name in walrep status",
        "control": "readers hand-shake, fetch and ack here, and walrep status and verify "
        "ask here (ROUTER)",
        "key": "the leader's CURVE secret key file (walrep keygen)",
    },
    configmod.ReaderConfig: {
        "id": "this reader's id, unique in its cluster (required)",
        "control": "bind a control endpoint answering walrep verify and walrep status "
        "(default: none)",
        "key": "this reader's CURVE secret key file (walrep keygen)",
    },
}


def _config_flags(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config; flags override its keys")
    defaults = cls()
    for key in configmod.key_names(cls):
        flag = "--" + key.replace("_", "-")
        default = getattr(defaults, key)
        text = _ROLE_HELP[cls].get(key) or _KEY_HELP.get(key)
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=key, action="store_const", const=True, default=None, help=text
            )
        else:
            if text is not None and default not in ("", None) and "default" not in text:
                text += f"; default {default}"
            parser.add_argument(
                flag, dest=key, type=type(default), default=None, metavar=key.upper(), help=text
            )


def _load_config(cls, args: argparse.Namespace):
    overrides = {key: getattr(args, key) for key in configmod.key_names(cls)}
    return configmod.load(cls, args.config, overrides)


def tune_for_latency() -> None:
    import gc

    # A WAL writer thread (async mode) needs the GIL to start each group commit; by
    # default a busy trio thread keeps it for up to 5 ms, which shows in commit latency.
    sys.setswitchinterval(0.0005)
    # Everything built so far (modules, config) lives as long as the process: keep it
    # out of every full collection, whose pause is a commit-latency outlier (README,
    # Performance).
    gc.freeze()


def cmd_leader(args: argparse.Namespace) -> int:
    import trio

    from . import logs
    from .leader import run_leader

    config = _load_config(configmod.LeaderConfig, args)
    startup.check_node(config)  # before the WAL or a socket is opened
    logs.setup(config.log_level, config.log_json)
    tune_for_latency()
    try:
        return trio.run(run_leader, config)
    except (node.WALError, OSError) as exc:
        # Raised bare only while the WAL opens (errors once running come in a group).
        return _cannot_open("leader", config, exc)


def cmd_reader(args: argparse.Namespace) -> int:
    import trio

    from . import logs
    from .reader import run_reader

    config = _load_config(configmod.ReaderConfig, args)
    startup.check_node(config)  # before the WAL is opened or the leader hears of us
    logs.setup(config.log_level, config.log_json)
    tune_for_latency()
    try:
        return trio.run(run_reader, config)
    except (node.WALError, OSError) as exc:
        return _cannot_open("reader", config, exc)


def _cannot_open(command: str, config, exc: Exception) -> int:
    """One line for a WAL that would not open (damaged, locked, unwritable): exit 2."""
    if isinstance(exc, OSError) and exc.filename is not None:
        why = f"{exc.filename}: {exc.strerror or exc}"
    else:
        why = str(exc)
    print(f"walrep {command}: {config.source}: key 'wal_dir': {why}", file=sys.stderr)
    return EXIT_INVALID


def _check_ack(command: str, ack: str | None) -> bool:
    """Refuse an ack level the leader would refuse, before anything is sent."""
    if ack is None:
        return True
    try:
        configmod.parse_ack(ack)
    except ValueError as exc:
        print(f"walrep {command}: --ack: {exc}", file=sys.stderr)
        return False
    return True


def cmd_append(args: argparse.Namespace) -> int:
    import trio

    from .client import ClientError, open_client

    if not _check_ack("append", args.ack):
        return EXIT_INVALID
    try:
        records = json.loads(args.json)
    except ValueError as exc:
        print(f"walrep append: the argument is not JSON: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        print("walrep append: give one JSON object or a list of objects", file=sys.stderr)
        return EXIT_ERROR

    async def run() -> int:
        async with open_client(
            args.ingest, timeout=args.timeout, ack=args.ack, keys=args.keys
        ) as client:
            return await client.append_records(
                records, database=args.database, retries=args.retries
            )

    try:
        seq = trio.run(run)
    except (ClientError, fmt.WALError) as exc:
        print(f"walrep append: {args.ingest}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(seq)
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    from .loadgen import run_load

    if not _check_ack("load", args.ack):
        return EXIT_INVALID
    tune_for_latency()  # it measures commit latency
    return run_load(args)


def cmd_forget_reader(args: argparse.Namespace) -> int:
    import trio

    from .admin import AdminError, forget_reader

    try:
        status = trio.run(forget_reader, args.control, args.reader_id, args.timeout, args.keys)
    except AdminError as exc:
        print(f"walrep forget-reader: {exc}", file=sys.stderr)
        return EXIT_ERROR
    remaining = ", ".join(r["id"] for r in status["readers"]) or "none"
    print(f"forgot {args.reader_id}; readers the leader retains for: {remaining}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import trio

    from .admin import AdminError, status
    from .statusview import render_table, script_view

    try:
        view = trio.run(status, args.control, args.timeout, args.keys)
    except AdminError as exc:
        print(f"walrep status: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(script_view(view), indent=2))
    else:
        print(render_table(view))
    return EXIT_OK


EXIT_DIFFER = 1
EXIT_VERIFY_ERROR = 2


def cmd_verify(args: argparse.Namespace) -> int:
    import trio

    from .progress import Progress
    from .verify import VerifyError, verify

    for spec in (args.a, args.b):
        if not spec.startswith("tcp://") and not os.path.isdir(spec):
            print(f"walrep verify: {spec}: not a WAL directory or tcp:// endpoint", file=sys.stderr)
            return EXIT_VERIFY_ERROR
    progress = Progress("verify", total=None)
    try:
        report = trio.run(
            verify,
            args.a,
            args.b,
            args.from_seq,
            args.to_seq,
            args.timeout,
            progress.update,
            args.keys,
        )
    except VerifyError as exc:
        progress.done()
        print(f"walrep verify: {exc}", file=sys.stderr)
        return EXIT_VERIFY_ERROR
    progress.done()
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(report.text())
    if report.damage:
        return EXIT_VERIFY_ERROR  # a damaged log is not "different": it needs repair first
    return EXIT_OK if report.equal else EXIT_DIFFER


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        role = args.role or _guess_role(args.file)
        cls = configmod.LeaderConfig if role == "leader" else configmod.ReaderConfig
        config = configmod.load(cls, args.file, {})
    except configmod.ConfigError as exc:
        print(f"walrep check-config: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.file}: a valid {role} config")
    for key in configmod.key_names(cls):
        print(f"  {key} = {getattr(config, key)!r}")
    return EXIT_OK


def _guess_role(path: str) -> str:
    """The role whose own keys the file has; ConfigError if it has none, or both roles'."""
    import tomllib

    try:
        with open(path, "rb") as f:
            keys = set(tomllib.load(f))
    except (OSError, tomllib.TOMLDecodeError):
        return "leader"  # load() will report the file's problem
    leader_keys = set(configmod.key_names(configmod.LeaderConfig))
    reader_keys = set(configmod.key_names(configmod.ReaderConfig))
    leader_only = sorted(keys & (leader_keys - reader_keys))
    reader_only = sorted(keys & (reader_keys - leader_keys))
    if reader_only and not leader_only:
        return "reader"
    if leader_only and not reader_only:
        return "leader"
    if leader_only:
        why = (
            f"it has leader keys ({', '.join(leader_only)}) and reader keys "
            f"({', '.join(reader_only)})"
        )
    else:
        # wal_dir, id, sync_mode, control... are both roles' keys.
        why = (
            "it has no key only one role has (a reader has leader_publish and "
            "leader_control; a leader, ingest and publish)"
        )
    raise configmod.ConfigError(
        f"{path}: cannot tell whether this is a leader's or a reader's config: {why}; "
        "say which with --role leader or --role reader"
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    from .security import keygen

    try:
        key_path, pub_path = keygen(args.prefix)
    except FileExistsError as exc:
        print(f"walrep keygen: {exc.filename} exists; not overwriting a key", file=sys.stderr)
        return EXIT_ERROR
    print(f"secret key: {key_path} (mode 600, keep it on this host)")
    print(f"public key: {pub_path} (copy it into the leader's allow list)")
    return EXIT_OK


def _key_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", default=None, metavar="FILE", help="this side's secret key")
    parser.add_argument(
        "--leader-key", default=None, metavar="FILE", help="the leader's public key (.pub)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="walrep", description="A replicated write-ahead log.")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_Parser,
        help="one of these; walrep COMMAND --help gives its flags",
    )

    dump = sub.add_parser("dump", help="print the entries of a WAL directory or file")
    dump.add_argument("path", help="a WAL directory or one .wal file")
    dump.add_argument(
        "--from-seq",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the first sequence to print (default: the first held)",
    )
    dump.add_argument(
        "--to-seq",
        type=_positive_int,
        default=None,
        metavar="M",
        help="the last sequence to print (default: the last held)",
    )
    dump.add_argument("--json", action="store_true", help="one JSON object per line")
    dump.set_defaults(func=cmd_dump)

    leader = sub.add_parser("leader", help="run a leader node")
    _config_flags(leader, configmod.LeaderConfig)
    leader.set_defaults(func=cmd_leader)

    reader = sub.add_parser("reader", help="run a reader node")
    _config_flags(reader, configmod.ReaderConfig)
    reader.set_defaults(func=cmd_reader)

    append = sub.add_parser("append", help="append one row-format entry and print its sequence")
    append.add_argument(
        "--ingest", required=True, metavar="EP", help="the leader's ingest endpoint"
    )
    append.add_argument("--database", default=None, help="wrap the entry in a database envelope")
    append.add_argument(
        "--ack", default=None, help=configmod.ACK_LEVELS_HELP + " (default: the leader's)"
    )
    append.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for the leader's answer (default 10)",
    )
    append.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="resend on an unknown outcome, up to N times (no duplicates)",
    )
    append.add_argument("json", help="one JSON object, or a list of them")
    _key_flags(append)
    append.set_defaults(func=cmd_append)

    forget = sub.add_parser(
        "forget-reader", help="stop retaining the leader's log for a reader that is gone"
    )
    forget.add_argument("reader_id", metavar="ID", help="the id of the reader that is gone")
    forget.add_argument(
        "--control", required=True, metavar="EP", help="the leader's control endpoint"
    )
    forget.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for the leader's answer (default 10)",
    )
    _key_flags(forget)
    forget.set_defaults(func=cmd_forget_reader)

    verify = sub.add_parser(
        "verify",
        help="are two logs the same over a range, where do they first differ, is one damaged",
        epilog="exit status: 0 identical, 1 different (or one lacks a range), "
        "2 damage found (with side, file, offset and sequence) or a log could not be read",
    )
    verify.usage_exit_status = EXIT_VERIFY_ERROR
    verify.add_argument(
        "a", metavar="A", help="a WAL directory or a node's tcp:// control endpoint"
    )
    verify.add_argument(
        "b", metavar="B", help="the other log: a WAL directory or a tcp:// control endpoint"
    )
    verify.add_argument(
        "--from-seq",
        type=_positive_int,
        default=None,
        metavar="N",
        help="compare from this sequence (default: the first both logs hold)",
    )
    verify.add_argument(
        "--to-seq",
        type=_positive_int,
        default=None,
        metavar="M",
        help="compare up to this sequence (default: the last of the longer log)",
    )
    verify.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        help="seconds to wait for each answer of a node asked over tcp:// (default 30)",
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: holds, missing, first_difference, damage",
    )
    _key_flags(verify)
    verify.set_defaults(func=cmd_verify)

    check = sub.add_parser("check-config", help="check a leader or reader config file")
    check.add_argument("file", metavar="FILE", help="the TOML config file to check")
    check.add_argument(
        "--role",
        choices=["leader", "reader"],
        default=None,
        help="default: the role whose own keys the file has (leader_* for a reader; "
        "ingest, publish for a leader)",
    )
    check.set_defaults(func=cmd_check_config)

    keygen = sub.add_parser("keygen", help="write a CURVE key pair: PREFIX.key and PREFIX.pub")
    keygen.add_argument(
        "prefix", metavar="PREFIX", help="path and name of the key files, without .key/.pub"
    )
    keygen.set_defaults(func=cmd_keygen)

    status = sub.add_parser(
        "status",
        help="every node's position, lag and state",
        description="A node's view of the cluster: asked at the leader's control endpoint, "
        "every node's position, lag and state; at a reader's, that reader's own.",
    )
    status.add_argument(
        "--control",
        required=True,
        metavar="EP",
        help="any node's control endpoint: the leader's (every node) or a reader's "
        "(that reader alone)",
    )
    status.add_argument("--json", action="store_true", help="one JSON object with a nodes list")
    status.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for the node's answer (default 10)",
    )
    _key_flags(status)
    status.set_defaults(func=cmd_status)

    load = sub.add_parser("load", help="generate load against a leader")
    load.add_argument("--ingest", required=True, metavar="EP", help="the leader's ingest endpoint")
    load.add_argument(
        "--count", type=_positive_int, required=True, metavar="N", help="entries to append"
    )
    load.add_argument(
        "--size",
        type=_positive_int,
        default=100,
        metavar="BYTES",
        help="payload bytes per entry (default 100)",
    )
    load.add_argument(
        "--batch",
        type=_positive_int,
        default=100,
        metavar="K",
        help="entries per request (default 100)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="entries/s to pace to (default: as fast as the leader takes them)",
    )
    load.add_argument(
        "--inflight",
        type=_positive_int,
        default=16,
        metavar="M",
        help="requests in flight at once (default 16)",
    )
    load.add_argument(
        "--ack", default=None, help=configmod.ACK_LEVELS_HELP + " (default: the leader's)"
    )
    load.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for a request's answer before its outcome is unknown (default 10)",
    )
    load.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="resend a request whose outcome is unknown, up to N times",
    )
    load.add_argument(
        "--nowait",
        action="store_true",
        help="ask the leader to refuse (busy) instead of waiting when full",
    )
    load.add_argument("--log", default=None, metavar="FILE", help="one JSON line per entry")
    load.add_argument("--summary", default=None, metavar="FILE", help="totals as JSON")
    _key_flags(load)
    load.set_defaults(func=cmd_load)

    checker = sub.add_parser(
        "check-history",
        help="check walrep load --log histories against the final WAL of every node",
        description=history.DESCRIPTION,
        epilog=history.EPILOG,
    )
    checker.usage_exit_status = history.EXIT_USAGE
    history.add_arguments(checker)
    checker.set_defaults(func=history.run)
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a sequence (they start at 1)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "leader_key") and args.command not in ("reader",):
        from .security import KeyFileError, load_client_keys

        try:
            args.keys = load_client_keys(args.key, args.leader_key)
        except KeyFileError as exc:
            print(f"walrep {args.command}: {exc}", file=sys.stderr)
            return EXIT_VERIFY_ERROR if args.command == "verify" else EXIT_ERROR
    try:
        return args.func(args)
    except configmod.ConfigError as exc:
        print(f"walrep {args.command}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `walrep dump ... | head` closes the pipe early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

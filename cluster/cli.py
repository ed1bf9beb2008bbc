"""The `walrep` command line: one sub-command per job, each in a small function.

Exit statuses: 0 success, 1 usage or I/O error, 3 (dump) damage found in a log.
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

import node
from node import format as fmt

EXIT_OK = 0
EXIT_ERROR = 1
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
    try:
        for entry in entries:
            if args.json:
                line = json.dumps(entry_as_json(entry), default=_json_default, ensure_ascii=False)
            else:
                line = _entry_as_text(entry)
            out.write(line + "\n")
    except OSError as exc:
        print(f"walrep dump: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_DAMAGED if problems else EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; walrep's commands document 1 (verify keeps 2)."""

    usage_exit_status = EXIT_ERROR

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit_status, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="walrep", description="A replicated write-ahead log.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    dump = sub.add_parser("dump", help="print the entries of a WAL directory or file")
    dump.add_argument("path", help="a WAL directory or one .wal file")
    dump.add_argument("--from-seq", type=_positive_int, default=None, metavar="N")
    dump.add_argument("--to-seq", type=_positive_int, default=None, metavar="M")
    dump.add_argument("--json", action="store_true", help="one JSON object per line")
    dump.set_defaults(func=cmd_dump)
    return parser


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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `walrep dump ... | head` closes the pipe early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

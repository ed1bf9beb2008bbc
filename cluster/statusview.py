"""`walrep status`: a node's view, as a table or stable JSON.

Asked at the leader's control endpoint, the status holds every node and a log-wide
footer; at a reader's, that reader alone.
"""

from __future__ import annotations

from typing import Any

COLUMNS = [
    ("NODE", "id"),
    ("ROLE", "role"),
    ("STATE", "state"),
    ("ADDRESS", "address"),
    ("APPLIED", "applied_seq"),
    ("DURABLE", "durable_seq"),
    ("LAG", "lag_entries"),
    ("LAG BYTES", "lag_bytes"),
    ("LAG S", "lag_seconds"),
    ("CONTACT", "last_contact_s_ago"),
    ("TOO OLD IN", "time_until_too_old_s"),
]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _cell(key: str, node: dict[str, Any]) -> str:
    value = node.get(key)
    if key == "lag_bytes":
        return _bytes(value or 0)
    if key in ("lag_seconds", "last_contact_s_ago"):
        return _seconds(value)
    if key == "time_until_too_old_s":
        if node["role"] == "leader":
            return "-"
        return "unbounded" if value is None else _seconds(value)
    return "-" if value is None else str(value)


def render_table(status: dict[str, Any]) -> str:
    rows = [[title for title, _ in COLUMNS]]
    rows += [[_cell(key, node) for _, key in COLUMNS] for node in status["nodes"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if "write_rate" not in status:
        return "\n".join(lines)  # a reader's own status: no log-wide footer
    rate = status["write_rate"]
    leader = status["nodes"][0]
    lines.append("")
    lines.append(
        f"log {status['log_id']}  head {status['head_seq']}  earliest retained "
        f"{status['earliest_seq']} ({_bytes(leader.get('retained_bytes', 0))})  "
        f"writing {rate['entries_per_s']:,.0f} entries/s ({_bytes(rate['bytes_per_s'])}/s)"
    )
    return "\n".join(lines)


def script_view(status: dict[str, Any]) -> dict[str, Any]:
    """The JSON printed by --json: stable keys for scripts."""
    keys = ("log_id", "head_seq", "earliest_seq", "write_rate", "nodes", "leader")
    return {key: status[key] for key in keys if key in status}

#!/usr/bin/env python3
"""Check `walrep load --log` histories against the final WAL of every node.

The same as `walrep check-history` (arguments, output, exit status 0 no violation,
1 violations found, 2 usage errors); the checker is walrep.cluster.history.
"""

import sys

from walrep.cluster import history

if __name__ == "__main__":
    sys.exit(history.main(prog="check_history.py"))

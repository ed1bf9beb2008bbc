#!/usr/bin/env python3
"""`make chaos`: faults under load, then the history check (walrep.cluster.chaos).

python scripts/chaos.py --seconds 600 --seed 1 [--dir DIR] [--keep] [--net auto]
"""

import sys

from walrep.cluster import chaos

if __name__ == "__main__":
    sys.exit(chaos.main())

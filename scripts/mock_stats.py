#!/usr/bin/env python3
"""Read the mock provider's JSON (SPEC section 9) from stdin and print one number.

    curl -s localhost:3001/deliveries | mock_stats.py unique      # distinct Idempotency-Keys
    curl -s localhost:3001/deliveries | mock_stats.py fifo        # 1 if first deliveries came in key order
    curl -s localhost:3001/stats      | mock_stats.py duplicates  # repeated keys
"""

import json
import sys


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    data = json.load(sys.stdin)
    if what == "unique":
        print(len({d["key"] for d in data}))
    elif what == "fifo":
        keys = [d["key"] for d in sorted(data, key=lambda d: (d["first_seen_us"], d["key"]))]
        ids = [int(k) for k in keys]
        print(1 if ids == sorted(ids) else 0)
    elif what == "duplicates":
        print(int(data["duplicates"]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

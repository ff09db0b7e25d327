#!/usr/bin/env python3
"""Read the mock provider's JSON (GET /deliveries or /stats, src/provider/mock.rs) from
stdin and print one number (scripts/verify/image.sh uses it).

    curl -s localhost:3001/deliveries | mock_stats.py unique      # distinct Idempotency-Keys
    curl -s localhost:3001/deliveries | mock_stats.py fifo KEYS   # 1 if first deliveries came in id order
                                   # KEYS: a file of "<delivery key> <message id>" lines
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
        # The provider sees delivery keys; the order that matters is the messages' ids.
        with open(sys.argv[2]) as f:
            id_of_key = {key: int(mid) for key, mid in (line.split() for line in f if line.strip())}
        ids = [id_of_key.get(d["key"], -1) for d in sorted(data, key=lambda d: d["first_seen_us"])]
        print(1 if ids == sorted(ids) and -1 not in ids else 0)
    elif what == "duplicates":
        print(int(data["duplicates"]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

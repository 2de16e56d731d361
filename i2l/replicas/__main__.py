"""`python -m i2l.replicas OUT_DIR [names...]`: write the replicas (all of them by default)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> int:
    from i2l.replicas import REPLICAS, write_replicas

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m i2l.replicas OUT_DIR [names...]\nnames: {', '.join(REPLICAS)}")
        return 0 if argv else 2
    for name, path in write_replicas(argv[0], argv[1:] or None).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

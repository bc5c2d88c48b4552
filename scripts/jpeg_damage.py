"""How much damage to a JPEG's compressed data does the strict decode notice?

Usage: python scripts/jpeg_damage.py [FILMS] [CHANGES]
Changes one byte (xor 0x55) at CHANGES (default 15) evenly spaced places in the compressed data of each of the
first FILMS (default 20) cxr4 JPEGs in name order, and counts how many are refused (`io.readers.jpeg_corruption`), by
libjpeg's complaint, and how many decode without one.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

from patchflannel.bench.harness import default_images
from patchflannel.io.readers import jpeg_corruption


def main(films: int = 20, changes: int = 15) -> None:
    root = default_images()
    if root is None:
        sys.exit("needs the shared cxr4 data (../shared/data/cxr4)")
    outcomes: Counter[str] = Counter()
    for path in sorted(root.glob("images/*/*.jpg"))[:films]:
        data = path.read_bytes()
        scan = data.index(b"\xff\xda")
        for offset in range(1000, len(data) - scan - 10, max(1, (len(data) - scan) // changes)):
            changed = bytearray(data)
            changed[scan + offset] ^= 0x55
            complaint = jpeg_corruption(bytes(changed))
            reason = "decoded without complaint" if complaint is None else f"refused: {complaint.split(': ')[1]}"
            outcomes[re.sub(r"^refused: \d+ ", "refused: N ", reason)] += 1
    for outcome, count in outcomes.most_common():
        print(f"{count:5d}  {outcome}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

"""What the bad-input sweep (tests/serving/test_bad_input.py) sends through the real server, per RPC and
status code: the "bad inputs tried" part of the hardening table in bench/README.md. The sweep itself runs in
the test suite; this prints its cases, so the table cannot drift from what the tests check.

    python bench/hardening.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "serving")]

import test_bad_input as sweep  # noqa: E402  (needs the test helpers on the path)


def main() -> None:
    counts: Counter[tuple[str, str]] = Counter((case.rpc, case.code.name) for case in sweep.CASES)
    for name, *_ in sweep.MALFORMED_CALLS:
        rpc = name.rsplit("/", 1)[1]
        counts[(f"{rpc} (malformed)", "INVALID_ARGUMENT")] += sum(
            1 for case in sweep.MALFORMED_CASES if case.values[0] == name
        )
    codes = sorted({code for _, code in counts})
    print("| RPC | " + " | ".join(codes) + " | cases |")
    print("| --- | " + " | ".join("---:" for _ in codes) + " | ---: |")
    for rpc in sorted({rpc for rpc, _ in counts}):
        row = [counts[(rpc, code)] for code in codes]
        print(f"| {rpc} | " + " | ".join(str(n) if n else "" for n in row) + f" | {sum(row)} |")
    total = sum(counts.values())
    print(f"\n{total} calls, {total - sum(n for (_, code), n in counts.items() if code == 'OK')} of them refused")


if __name__ == "__main__":
    main()

"""Print the ids of the tests the last pytest run failed, one a line, from pytest's own
cache: `make test` ends with them, so a CI log names its failures in its last lines."""

import json
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "v" / "cache" / "lastfailed"


def main() -> int:
    failed = sorted(json.loads(CACHE.read_text())) if CACHE.exists() else []
    print(f"failed tests ({len(failed)}):" if failed else "failed: no test failed (see above)")
    for test_id in failed:
        print(f"  {test_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

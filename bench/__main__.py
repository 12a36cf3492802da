"""`python -m bench NAME [--quick] [--out DIR]`; `python -m bench all` runs every benchmark."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import batch, fairness, overhead, overload, ratelimit, tools

BENCHMARKS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "batch": batch.run,
    "ratelimit": ratelimit.run,
    "fairness": fairness.run,
    "tools": tools.run,
    "overhead": overhead.run,
    "overload": overload.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = parser.parse_args()
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        figures = BENCHMARKS[name](args.out, args.quick)
        print(json.dumps({name: figures}, indent=2))
        print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prints commands from README.md's shell blocks so that CI runs them verbatim.

    python3 .ci/readme_commands.py fresh 1     # the "Fresh machine" install + main job
    python3 .ci/readme_commands.py fresh 2     # the "Fresh machine" install + tests
    python3 .ci/readme_commands.py cuda 1      # the "Building with CUDA" block
    python3 .ci/readme_commands.py rl 1 --lines "pip install" "blip rl --smoke"

A block is found by its section heading and its place among that section's ```bash
blocks; `--lines` keeps only the lines that start with one of the given prefixes. A
section that is missing or no longer has its expected blocks is an error (exit 2) naming
what was expected, so an edit of the README that CI cannot follow fails CI instead of
being skipped. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# name -> (heading text, number of ```bash blocks the section must hold)
SECTIONS = {
    "fresh": ("Fresh machine: two commands", 2),
    "cuda": ("Building with CUDA", 1),
    "rl": ("Continual RL (`blip rl`)", 2),
}


class ReadmeError(ValueError):
    """The README no longer has the block CI runs."""


def section_blocks(text: str, heading: str) -> list[str]:
    """The bodies of the ```bash blocks between `heading` and the next heading of the same
    or a higher level."""
    lines = text.splitlines(keepends=True)
    start = level = None
    for i, line in enumerate(lines):
        m = re.match(r"(#+) (.*?)\s*$", line)
        if m and m.group(2) == heading:
            start, level = i + 1, len(m.group(1))
            break
    if start is None:
        raise ReadmeError(f"README.md has no section headed {heading!r}")
    end = len(lines)
    fence = False
    for i in range(start, len(lines)):
        if lines[i].startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"(#+) ", lines[i])
        if m and len(m.group(1)) <= level:
            end = i
            break
    body = "".join(lines[start:end])
    return re.findall(r"^```bash\n(.*?)^```", body, re.S | re.M)


def block(name: str, index: int, text: str | None = None) -> str:
    """Block `index` (1-based) of section `name`, checked against SECTIONS."""
    heading, count = SECTIONS[name]
    blocks = section_blocks(README.read_text() if text is None else text, heading)
    if len(blocks) != count:
        raise ReadmeError(f"README section {heading!r} holds {len(blocks)} ```bash blocks; "
                          f"CI expects {count} (see .ci/readme_commands.py)")
    if not 1 <= index <= count:
        raise ReadmeError(f"section {heading!r} has blocks 1..{count}, not {index}")
    return blocks[index - 1]


def keep_lines(body: str, prefixes: list[str]) -> str:
    """The lines of `body` starting with one of `prefixes`; each prefix must match one."""
    kept = [line for line in body.splitlines() if line.startswith(tuple(prefixes))]
    for p in prefixes:
        if not any(line.startswith(p) for line in kept):
            raise ReadmeError(f"no line of the block starts with {p!r}")
    return "\n".join(kept) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("index", type=int, help="which ```bash block of the section, from 1")
    ap.add_argument("--lines", nargs="+", metavar="PREFIX",
                    help="print only the lines starting with these prefixes")
    args = ap.parse_args(argv)
    try:
        body = block(args.section, args.index)
        if args.lines:
            body = keep_lines(body, args.lines)
    except ReadmeError as e:
        print(f"readme_commands: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

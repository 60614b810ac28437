"""The fenced examples of README.md and docs/*.md, and how the test suite runs each one.

Every fence is run or checked (tests/docs/test_doc_blocks.py fails on one that is neither):

- ```python: pytest-codeblocks (PyPI) runs it (scripts/test.sh: `pytest --codeblocks`),
  in a fresh temporary folder, through tests/docs/doc_plugin.py;
- ```sh: tests/docs/test_doc_blocks.py runs it with bash -euo pipefail, from a temporary
  folder that holds links to the repository's build/, scripts/, bench/, examples/, ...;
- any other fence (```cpp, ```cmake, output, file formats) says how it is checked in a
  marker, an HTML comment on the line before the fence (GitHub does not show it):

      <!-- doc-test: KEY[=VALUE] ... -->

Keys:
  id=NAME         names the block (for other scripts: `doc_blocks.py extract FILE NAME`)
  quick           long commands run on their stand-ins (STAND_INS below: fewer steps,
                  --quick sizes, listing instead of timing); the doc says so beside it
  standin=NAME    Python: a tiny model folder of the name the example opens (doc_plugin.py)
  output-of=NAME  the block is the output of the named check (test_doc_blocks.py)
  checked-by=NAME a named check of test_doc_blocks.py reads the block (file formats, ...)
  run-by=PATH     a script of the test suite runs the block (it must extract it by id)
  ci              the commands are what CI runs (.ci/run and the scripts it calls must
                  contain each line)

Usage: python3 tests/docs/doc_blocks.py extract FILE ID  (prints the block's text)
"""
import dataclasses
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"<!--\s*doc-test:(.*?)-->")


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int            # 1-based line of the opening fence
    lang: str            # the fence's first word ("" for none)
    code: str
    keys: dict

    @property
    def name(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_keys(text):
    keys = {}
    for word in text.split():
        k, _, v = word.partition("=")
        keys[k] = v if v else True
    return keys


def blocks(path):
    """The fences of one Markdown file, with the marker of the line before each (blank lines
    between them allowed)."""
    lines = pathlib.Path(path).read_text().splitlines()
    out, i, pending = [], 0, None
    while i < len(lines):
        line = lines[i]
        m = MARKER.search(line)
        if m:
            pending = parse_keys(m.group(1))
        elif line.lstrip().startswith("```"):
            ticks = len(line.lstrip()) - len(line.lstrip().lstrip("`"))
            info = line.strip()[ticks:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("`" * ticks):
                j += 1
            out.append(Block(pathlib.Path(path), i + 1, info.split()[0] if info else "",
                             "\n".join(lines[i + 1:j]) + "\n", pending or {}))
            pending, i = None, j
        elif line.strip():
            pending = pending if line.strip().startswith("<!--") else None
        i += 1
    return out


def all_blocks():
    return [b for p in DOC_FILES for b in blocks(p)]


def find(path, ident):
    for b in blocks(path):
        if b.keys.get("id") == ident:
            return b
    raise KeyError(f"{path}: no block with id={ident}")


# ---- stand-ins for long commands (blocks marked `quick`) ----------------------------------
# Each rule rewrites one command line of a block: the command still runs with the block's own
# flags, on a small size. docs/README state this beside every `quick` block.
STAND_INS = [
    # moe train: 30 steps (its default is 3000): the flags of the block are all parsed and run.
    (r"(\bmoe train\b(?!.*--help).*)", r"\1 --steps 30 --eval-tokens 256"),
    # moe bench: --quick sizes, no PyTorch peer, one repeat (the block's --repeat replaced);
    # real-models writes its small checkpoints into the test's folder.
    (r"(\bmoe bench\b.*)", lambda m: re.sub(r" --(repeat \d+|no-peer|quick)\b", "", m.group(1))
     + " --quick --no-peer --repeat 1"
     + (' --workdir "$DOCTEST_TMP"' if "real-models" in m.group(1) else "")),
    # scripts/seeds.py: one seed, 30 steps a run, in a temporary folder.
    (r"(scripts/seeds\.py\b.*)", r'\1 --seeds 0 --common "--steps 30" --work "$DOCTEST_TMP/seeds"'),
    # Google Benchmark programs: list the benchmarks the filter selects instead of timing them
    # (an empty list fails).
    (r"(build/bin/bench_\w+\b.*)", r"\1 --benchmark_list_tests=true | grep ."),
    # The router benchmark script times for minutes: its syntax, and its program's list.
    (r"^bench/run_router_bench\.sh (\S+)$",
     r"bash -n bench/run_router_bench.sh && \1/bin/bench_router --benchmark_list_tests=true"),
    # The bench setup script installs kt-kernel's own environment (~3 GB): its syntax only.
    (r"^scripts/bench_setup\.sh\b.*", r"bash -n scripts/bench_setup.sh"),
    # ... and its interpreter: the peer script runs on the suite's Python (it reports kt-kernel
    # as not importable there, and exits 0).
    (r"^\.venv-kt/bin/python\b", r"python3"),
    # examples/generate.py at full size builds and times a model for minutes: its tiny sizes
    # (argparse keeps the last value of a repeated flag).
    (r"(examples/generate\.py\b(?!.*--tiny).*)", r"\1 --tiny --layers 1 --prompt 16 --new-tokens 4"),
    # The A/B of two builds times for many minutes and needs an old build: its usage.
    (r"^python3 bench/ab_compare\.py\b.*", r"python3 bench/ab_compare.py --help"),
    # moe_dist_bench: small sizes (its defaults are the docs' sizes; the last value counts).
    (r"(build/bin/moe_dist_bench\b.*)", r"\1 --tokens 64 --d 64 --dff 128 --steps 3"),
    # Presets: the name must be one CMake lists (configuring and building them is CI's:
    # scripts/setup.sh, scripts/sanitize.sh).
    (r"cmake --preset (\w+)[^&]*", r"cmake --list-presets | grep -q '\"\1\"' "),
    (r"cmake --build --preset (\w+)[^&]*", r"cmake --build --list-presets | grep -q '\"\1\"' "),
    (r"^ctest --preset (\w+).*", r"ctest --list-presets | grep -q '\"\1\"'"),
    # ctest: list the tests the regex selects (the suite runs them itself).
    (r"^(ctest --test-dir\b.*)", r"\1 -N | grep -E 'Total Tests: [1-9]'"),
]


def split_comment(line):
    """(code, comment) of a shell line: the comment starts at a # after a blank, outside
    quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def apply_stand_ins(code):
    """The block's command lines (backslash continuations joined, comments dropped), each
    rewritten by every rule that matches it, once."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line, _ = split_comment(line)
        for pat, rep in STAND_INS:
            line = re.sub(pat, rep, line, count=1)
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "extract":
        sys.exit(__doc__)
    sys.stdout.write(find(ROOT / sys.argv[2], sys.argv[3]).code)

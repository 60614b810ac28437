"""Exit 0 when every `name==version` pin of the requirements files given (and of the
constraint files they name with -c) is installed in this interpreter at that version; else
print the first difference and exit 1. scripts/setup.sh uses it to skip the pip install."""
import pathlib
import re
import sys
from importlib import metadata


def pins(path, seen):
    path = pathlib.Path(path).resolve()
    if path in seen:
        return
    seen.add(path)
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-c ", "-r ")):
            yield from pins(path.parent / line[3:].strip(), seen)
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)", line)
        if not m:
            sys.exit(f"{path}: not a name==version pin: {line}")
        yield m.group(1), m.group(3)


def main():
    for req in sys.argv[1:]:
        for name, version in pins(req, set()):
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                print(f"{name}: not installed (want {version})", file=sys.stderr)
                return 1
            if have != version:
                print(f"{name}: {have} installed, want {version}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

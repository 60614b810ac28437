"""docs/errors.md as the tests read it: each row's messages (the `code` spans of its message
cells) as patterns, so that a test can hold the message it triggered to the row it triggers
(issue 22: the table had drifted from the code in three rows).

Pattern syntax, as the table writes it: `<name>` is any value, `[..]` or a bracketed
shape in letters (`[E, d, d_ff]`) any shape, `…` or `...` any text; everything else is
literal (`X[0]` included). A message must match one pattern of its row
whole. The C++ suite reads the same table the same way (tests/cpp/test_errors.cpp)."""
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
ERRORS_MD = ROOT / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*([A-Z]+[0-9]+)\s*\|")


def rows(path=ERRORS_MD):
    """Row id -> list of message patterns (every `code` span after the Case cell)."""
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        cells = line.split("|")[3:]  # "", row id, case, message cells...
        out[m.group(1)] = re.findall(r"`([^`]+)`", "|".join(cells))
    return out


def to_regex(template):
    out, i = "", 0
    for m in re.finditer(r"<[^<>]+>|\[[^\]\[]*[A-Za-z.][^\]\[]*\]|…|\.\.\.", template):
        out += re.escape(template[i:m.start()])
        tok = m.group(0)
        if tok.startswith("["):
            # [<t>] is one index; [..], [E, d] a shape
            out += r"\[.+?\]" if tok.startswith("[<") else r"\[[^\]]*\]"
        else:
            out += ".*?" if tok in ("…", "...") else ".+?"
        i = m.end()
    return out + re.escape(template[i:])


def matches(row, message, table=None):
    table = table or rows()
    assert row in table, f"docs/errors.md has no row {row}"
    return any(re.fullmatch(to_regex(t), message, re.S) for t in table[row])


def current_row():
    """The row of the running test, from its name (test_R1_..., test_L16_...)."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1]
    m = re.match(r"test_([A-Z]+[0-9]+)_", name)
    return m.group(1) if m else None


def check(message, row=None):
    """Asserts that message is one of its row's messages in docs/errors.md."""
    row = row or current_row()
    if row is None:
        return
    message = message[len("moe: "):] if message.startswith("moe: ") else message
    assert matches(row, message), (
        f"docs/errors.md row {row} does not show this message:\n  {message}\n"
        f"the row's messages: {rows()[row]}")


class raises:
    """pytest.raises(exc, match=...) whose message must also be one of the messages of the
    running test's row (or `row`)."""

    def __init__(self, exc, match=None, row=None):
        import pytest
        self.cm, self.row = pytest.raises(exc, match=match), row

    def __enter__(self):
        self.info = self.cm.__enter__()
        return self.info

    def __exit__(self, *exc):
        out = self.cm.__exit__(*exc)
        check(str(self.info.value), self.row)
        return out

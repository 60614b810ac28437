"""`moe train --help` against the code (issue 22: it left clamped_swiglu out of the expert
kinds): every value a flag's help lists trains, and every value the library accepts for that
field is listed or refused by moe train with a reason; the router-family sentence of
docs/routing.md names exactly the options that have no flag."""
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOE = ROOT / "build" / "bin" / "moe"
pytestmark = pytest.mark.skipif(not MOE.exists(), reason=f"{MOE} not built")


def run(*args, cwd):
    return subprocess.run([str(MOE), "train", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def help_text():
    return subprocess.run([str(MOE), "train", "--help"], capture_output=True, text=True,
                          check=True).stdout


def listed_values():
    """flag -> the values its help lists as `a | b | c`."""
    out = {}
    for m in re.finditer(r"^\s+(--[\w-]+) \S+\s+(.*?)$", help_text(), re.M):
        vals = re.search(r"(\w+(?: \| \w+)+)", m.group(2))
        if vals:
            out[m.group(1)] = vals.group(1).split(" | ")
    return out


def test_help_lists_enumerations():
    flags = listed_values()
    assert flags["--expert"] == ["linear_relu", "mlp", "swiglu", "clamped_swiglu"]
    assert len(flags) >= 9, flags


@pytest.mark.parametrize("flag", sorted(listed_values()))
def test_listed_values_match_the_library(flag, tmp_path):
    listed = listed_values()[flag]
    # The library's own list, from the message it gives for a value it does not know.
    r = run(flag, "no_such_value", "--steps", "1", "--no-plots", "--out", "x", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    m = re.search(r"\(expected (.*)\)", r.stderr)
    assert m, r.stderr
    accepted = re.split(r", | or ", m.group(1))
    assert set(listed) <= set(accepted), (flag, listed, accepted)
    for value in accepted:
        r = run(flag, value, "--steps", "2", "--batch", "64", "--eval-tokens", "64",
                "--no-plots", "--out", value, cwd=tmp_path)
        if value in listed:
            assert r.returncode == 0, (flag, value, r.stderr)
        else:  # accepted by the library, not listed: moe train must refuse it, saying why
            assert r.returncode == 2 and value in r.stderr, (flag, value, r.stderr)


def test_default_run_time_is_not_overstated():
    """The help said "about a minute" for a run of seconds; it gives no wall time now."""
    assert "minute" not in help_text()


def test_routing_md_names_the_options_without_a_flag():
    import moe
    text = (ROOT / "docs" / "routing.md").read_text()
    sentence = re.search(r"except (.*?), a `moe train` flag", text, re.S).group(1)
    no_flag = set(re.findall(r"`(\w+)`", sentence))
    flags = set(re.findall(r"(--[\w-]+)", help_text()))
    # The router family: the keywords docs/spec.md §5 lists under "Router family".
    spec = (ROOT / "docs" / "spec.md").read_text()
    family = spec[spec.index("**Router family**"):spec.index("Definitions and invalid")]
    options = (set(moe.MoE(4, 4, 2).config) & set(re.findall(r"`(\w+)`", family))
               & set(re.findall(r"`(\w+)(?:=[^`]*)?`", text)))
    assert {"router", "bias_update_rate", "selection_bias", "shared_d_ff"} <= options
    for name in sorted(options):
        has = "--" + name.replace("_", "-") in flags
        assert has != (name in no_flag), (name, has, no_flag)

"""bridge.logsafe.clean: peer text that cannot break, forge or flood a log line."""

from __future__ import annotations

import codecs
import re
import string
import unicodedata

from hypothesis import example, given
from hypothesis import strategies as st

from bridge.logsafe import clean, counted

SUFFIX = re.compile(r"…\(\+(\d+) chars\)\Z")
# Every category, surrogates included (hypothesis leaves Cs out unless told), and extra weight on
# the characters an attacker would pick: line breaks, terminal escapes, bidi overrides, backslash.
DANGEROUS = "\n\r\t\x00\x1b\x7f\x85\xa0\u2028\u2029\u202e\u200b\ufeff\ud800\U000e0001\\"
ANY_TEXT = st.text(st.characters(exclude_categories=()) | st.sampled_from(DANGEROUS), max_size=300)
LIMITS = st.integers(min_value=0, max_value=200)


def unescape(shown: str) -> str:
    """The text ``shown`` stands for: its escapes decoded (non-ASCII first turned into escapes)."""
    return codecs.decode(shown.encode("ascii", "backslashreplace"), "unicode_escape")


@given(ANY_TEXT, LIMITS)
@example("line one\nFAKE: admin logged in", 120)
@example("\u2028\u2029\x1b[2J\u202e", 120)
def test_output_has_no_control_format_or_separator_character(text: str, limit: int) -> None:
    out = clean(text, limit)
    bad = [char for char in out if unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp")]
    assert not bad, (text, out)
    assert len(out.splitlines()) <= 1, "the output must stay on one line"


@given(ANY_TEXT, LIMITS)
@example("ab\\n", 3)
@example("x…(+1 chars)", 120)
def test_the_shown_part_is_at_most_limit_and_decodes_back_to_the_value(text: str, limit: int) -> None:
    whole = clean(text, 10**9)
    # Decoding gives back exactly the value: no escape can be forged (a literal backslash is
    # doubled), so the log says unambiguously what the peer sent.
    assert unescape(whole) == text
    out = clean(text, limit)
    if len(whole) <= limit:
        assert out == whole
        return
    match = SUFFIX.search(out)
    assert match is not None, out
    shown, missing = out[: match.start()], int(match.group(1))
    assert len(shown) <= limit
    assert 0 < missing <= len(text)
    # What is shown is the start of the value, and never half an escape.
    assert unescape(shown) == text[: len(text) - missing]


@given(st.text(st.sampled_from(string.printable.strip() + " ").filter(lambda c: c != "\\"), max_size=120))
def test_printable_ascii_without_backslash_passes_unchanged(text: str) -> None:
    assert clean(text) == text
    assert clean(text, len(text)) == text


def test_short_clean_text_takes_the_fast_path() -> None:
    text = "CA0123456789abcdef0123456789abcdef"
    assert clean(text, 40) is text, "the common case must not build a new string"


def test_line_breaks_and_escapes_are_shown_not_obeyed() -> None:
    assert clean("a\nb\r\tc") == r"a\nb\r\tc"
    assert clean("\x1b[31mred\x00") == r"\x1b[31mred\x00"
    assert clean("x\u2028y\u2029z\u202e") == r"x\u2028y\u2029z\u202e"
    assert clean("\U000e0041") == r"\U000e0041"
    assert clean("\ud800") == r"\ud800"
    assert clean("caf\xe9 \u4e2d") == "caf\xe9 \u4e2d", "printable non-ASCII is kept as it is"
    assert clean("no\xa0break") == r"no\xa0break", "a space that is not U+0020 is shown"


def test_a_backslash_is_doubled_so_escapes_cannot_be_forged() -> None:
    forged = r"x\ny"  # four characters: x, backslash, n, y
    assert clean(forged) == r"x\\ny"
    assert clean(forged) != clean("x\ny")


def test_a_long_value_is_cut_with_the_count_of_characters_left_out() -> None:
    assert clean("a" * 500, 120) == "a" * 120 + "…(+380 chars)"
    assert clean("a" * 10_000_000, 10) == "a" * 10 + "…(+9999990 chars)"
    assert clean("\n" * 100, 9) == r"\n\n\n\n" + "…(+96 chars)", "an escape is never cut in half"
    assert clean("ab\x1b", 5) == "ab…(+1 chars)", r"\x1b (4 characters) does not fit in the 3 left"
    assert clean("abc", 0) == "…(+3 chars)"
    assert clean("", 0) == ""


def test_values_that_are_not_strings() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert clean(None) == "None"
    assert clean(12.5) == "12.5"
    assert clean({"code": "X\nY"}) == r"{'code': 'X\\nY'}"
    assert clean(ValueError("bad\nthing")) == r"bad\nthing"
    assert clean(Hostile()) == "<unprintable Hostile>"


def test_counted_says_one_in_the_singular_and_the_rest_in_the_plural() -> None:
    assert [counted(n, "live call") for n in (0, 1, 2)] == ["0 live calls", "1 live call", "2 live calls"]
    assert [counted(n, "day") for n in (1.0, 0.5, 30.0)] == ["1 day", "0.5 days", "30 days"]
    assert counted(1, "delivery", "deliveries") == "1 delivery" and counted(3, "delivery", "deliveries") == "3 deliveries"
    assert counted(1, "call is live", "calls are live") == "1 call is live"

"""The redactor (bridge/redaction.py): numbers in any spelling and e-mail addresses never survive,
ordinary speech does, and nothing it is given makes it raise.

The numbers are spoken by this file's own speller (its own list of number words), so a word the
redactor forgot is a word these tests still look for.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bridge.redaction import MARKER, NUMBER_WORDS, redact_arguments, redact_result, redact_text, redact_value

# ------------------------------------------------------------------------ this file's speller

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
ORDINAL_TEENS = ["tenth", "eleventh", "twelfth", *(word + "th" for word in TEENS[3:])]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
ZERO_WORDS = ["zero", "oh", "o"]
# Every word the speller below can say for a number: none of them may be left after redaction.
SPOKEN = {
    *UNITS, *TEENS, *filter(None, TENS), *filter(None, ORDINAL_UNITS), *ORDINAL_TEENS,
    *(word[:-1] + "ieth" for word in filter(None, TENS)), "hundred", "thousand", "million", "billion", "oh", "o",
}
# Words of ordinary speech around the numbers: no number in them, nor "oh", "and", "double",
# "triple", "at" or "dot" (which join a run or make a spoken e-mail address; tested on their own).
ORDINARY = [
    "I", "need", "my", "the", "number", "is", "please", "call", "me", "back", "on", "card", "order",
    "account", "thanks", "ibuprofen", "Maria", "Lopez", "born", "it's", "that", "was", "for", "phone",
    "you", "can", "reach", "home", "yes", "Elm", "Street", "someone", "often", "none", "tone", "done",
    "O'Brien", "anyone", "to", "a", "box", "of", "aspirin", "pack", "refill", "date", "birth", "ok",
]


def below_thousand(number: int) -> str:
    hundreds, rest = divmod(number, 100)
    words = [f"{UNITS[hundreds]} hundred"] if hundreds else []
    if rest and hundreds:
        words.append("and")
    if rest >= 20:
        words.append(TENS[rest // 10] + (f"-{UNITS[rest % 10]}" if rest % 10 else ""))
    elif rest >= 10:
        words.append(TEENS[rest - 10])
    elif rest or not hundreds:
        words.append(UNITS[rest])
    return " ".join(words)


def cardinal(number: int) -> str:
    """English words for 0 to 999,999,999,999: "two thousand and three"."""
    parts = []
    for scale, size in (("billion", 1_000_000_000), ("million", 1_000_000), ("thousand", 1000)):
        if number >= size:
            parts.append(f"{below_thousand(number // size)} {scale}")
            number %= size
    if number or not parts:
        parts.append(("and " if parts and number < 100 else "") + below_thousand(number))
    return " ".join(parts)


def ordinal(day: int) -> str:
    if day < 10:
        return ORDINAL_UNITS[day]
    if day < 20:
        return ORDINAL_TEENS[day - 10]
    tens, unit = divmod(day, 10)
    return f"{TENS[tens]}-{ORDINAL_UNITS[unit]}" if unit else TENS[tens][:-1] + "ieth"


def year(value: int) -> str:
    """A year as people say it: "nineteen eighty", "nineteen oh five", "two thousand and three"."""
    century, rest = divmod(value, 100)
    if 2000 <= value < 2010:
        return cardinal(value)
    if rest == 0:
        return f"{cardinal(century)} hundred"
    return f"{cardinal(century)} {'oh ' + UNITS[rest] if rest < 10 else cardinal(rest)}"


@st.composite
def spoken_digits(draw: st.DrawFn, groups: list[str]) -> str:
    """Digit by digit, zero as zero, oh or o; sometimes "double five"; groups joined by a pause."""
    said_groups = []
    lone = len("".join(groups)) == 1
    for group in groups:
        words: list[str] = []
        index = 0
        while index < len(group):
            digit = int(group[index])
            # "oh" is zero only next to another number (as people say it): a lone 0 is "zero".
            word = draw(st.sampled_from(ZERO_WORDS)) if digit == 0 and not lone else UNITS[digit]
            if index + 1 < len(group) and group[index + 1] == group[index] and draw(st.booleans()):
                words.append(f"double {word}")
                index += 2
            else:
                words.append(word)
                index += 1
        said_groups.append(" ".join(words))
    return draw(st.sampled_from([", ", " ", " - ", ". "])).join(said_groups)


@st.composite
def mixed_digits(draw: st.DrawFn, groups: list[str]) -> str:
    """Each digit as a digit or a word: "4 one 5"."""
    digits = "".join(groups)
    return " ".join(draw(st.sampled_from([digit, UNITS[int(digit)]])) for digit in digits)


@st.composite
def written_digits(draw: st.DrawFn, groups: list[str]) -> str:
    return draw(st.sampled_from([" ", "-", ".", ", ", "/", " - ", "–"])).join(groups)


@st.composite
def group_cardinals(draw: st.DrawFn, groups: list[str]) -> str:
    """Each group as one number: "four hundred and fifteen, five hundred and fifty-five"."""
    return draw(st.sampled_from([", ", " "])).join(cardinal(int(group)) for group in groups)


SPELLINGS = [written_digits, spoken_digits, mixed_digits, group_cardinals]


def digit_groups(*lengths: int) -> st.SearchStrategy[list[str]]:
    return st.tuples(*(st.text("0123456789", min_size=length, max_size=length) for length in lengths)).map(list)


@st.composite
def numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A phone, card, account, order number or date in one spelling, and its redaction."""
    kind = draw(st.sampled_from(["phone", "card", "account", "order", "date"]))
    if kind == "date":
        day, month = draw(st.integers(1, 31)), draw(st.integers(1, 12))
        born = draw(st.integers(1900, 2025))
        form = draw(st.integers(0, 3))
        if form == 0:
            separator = draw(st.sampled_from(["/", "-", "."]))
            return f"{day:02d}{separator}{month:02d}{separator}{born}", MARKER
        if form == 1:  # "the twelfth of March, nineteen eighty": two runs around the month
            return f"{ordinal(day)} of {MONTHS[month - 1]}, {year(born)}", f"{MARKER} of {MONTHS[month - 1]}, {MARKER}"
        if form == 2:
            return f"{MONTHS[month - 1]} {ordinal(day)} {year(born)}", f"{MONTHS[month - 1]} {MARKER}"
        return f"{day} {month} {year(born)}", MARKER
    groups = draw({
        "phone": digit_groups(3, 3, 4),
        "card": digit_groups(4, 4, 4, 4),
        "account": st.integers(8, 12).flatmap(lambda length: digit_groups(length)),
        "order": st.integers(1, 7).flatmap(lambda length: digit_groups(length)),
    }[kind])
    if kind == "phone" and draw(st.integers(0, 4)) == 0:
        area, exchange, line = groups
        return draw(st.sampled_from([f"({area}) {exchange}-{line}", f"+1 {area} {exchange} {line}"])), MARKER
    spelling = draw(st.sampled_from(SPELLINGS))
    said = draw(spelling(groups))
    if draw(st.booleans()):
        said = said[0].upper() + said[1:]
    return said, MARKER


words = st.lists(st.sampled_from(ORDINARY), max_size=8).map(" ".join)


def strings_in(value: Any) -> list[str]:
    """Every string in a JSON-like value, keys included; a number is shown as its digits."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (*strings_in(key), *strings_in(item))]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    if isinstance(value, bool) or value is None:
        return []
    return [value if isinstance(value, str) else repr(value)]


def shows_a_digit(value: Any) -> bool:
    # Not json.dumps(value): its escapes ("\u0007" for a control character) are digits of its own.
    return any(char.isdigit() for text in strings_in(value) for char in text)


def number_words_left(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z'\u2019]+", text.lower()) if word in SPOKEN}


# ------------------------------------------------------------------------ numbers in sentences


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(numbers(), words, words, st.sampled_from(["", ".", ",", "?", "!"]))
@example(("four one five, five five five, oh one three four", MARKER), "my number is", "thanks", ".")
@example(("4 one 5", MARKER), "order", "", "")
@example(("nineteen eighty", MARKER), "born in", "", "")
@example(("two thousand and three", MARKER), "since", "", "")
@example(("twelve", MARKER), "order", "please", "")
@example(("12/03/1980", MARKER), "born", "", "")
@example(("4111-1111-1111-1111", MARKER), "card", "", "")
@example(("415 555 0134", MARKER), "", "", "")
def test_no_digit_and_no_number_word_survives_and_the_rest_is_kept(
    number: tuple[str, str], before: str, after: str, punctuation: str
) -> None:
    said, redacted = number
    text = " ".join(part for part in (before, said + punctuation, after) if part)
    result = redact_text(text)
    assert not any(char.isdigit() for char in result), result
    assert not number_words_left(result), result
    # Exactly one marker per run, and every word of ordinary speech around it still there.
    assert result == " ".join(part for part in (before, redacted + punctuation, after) if part)


@given(numbers())
def test_one_run_is_one_marker(number: tuple[str, str]) -> None:
    said, redacted = number
    assert redact_text(said) == redacted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call me on (415) 555-0134.", "call me on [redacted]."),
        ("+44 20 7946 0958 is the shop", "[redacted] is the shop"),
        ("order #12 please", "order #[redacted] please"),
        ("It costs 12.50. Then", "It costs [redacted]. Then"),
        ("I take 200mg of ibuprofen", "I take [redacted] of ibuprofen"),
        ("reference ORD1234, postcode SW1A 1AA", "reference [redacted], postcode [redacted]"),
        ("at 10:30 tomorrow", "at [redacted] tomorrow"),
        ("five o'clock", "[redacted] o'clock"),
        ("double oh seven", "[redacted]"),
        ("order double oh", "order [redacted]"),
        ("the twenty-first, ok", "the [redacted], ok"),
        ("in my fifties", "in my [redacted]"),
        ("ten and a half", "[redacted] and a half"),
        ("1, 2, and 3", "[redacted]"),
        ("year ２０２４, ² and ①", "year [redacted], [redacted] and [redacted]"),
        ("TWO THOUSAND AND THREE", "[redacted]"),
    ],
)
def test_examples(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The documented rule: a single number word is redacted wherever it stands.
        ("I need one box", "I need [redacted] box"),
        ("two of them", "[redacted] of them"),
        ("that one", "that [redacted]"),
        ("just a second", "just a [redacted]"),
        # "oh" is zero only next to another number; "oh oh" is two zeros.
        ("oh, I see", "oh, I see"),
        ("Oh! O'Brien here", "Oh! O'Brien here"),
        ("oh one three", "[redacted]"),
        ("five oh", "[redacted]"),
        ("oh oh", "[redacted]"),
        ("Oh, one box please", "[redacted] box please"),
        # Connectors only join two numbers.
        ("five and more", "[redacted] and more"),
        ("double check it", "double check it"),
    ],
)
def test_single_words_and_zero_words(text: str, expected: str) -> None:
    assert redact_text(text) == expected


# ------------------------------------------------------------------------------- e-mail


emails = st.builds(
    "{}@{}.{}".format,
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,10}){0,2}", fullmatch=True),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
name_words = st.from_regex(r"[a-z]{2,8}", fullmatch=True).filter(
    lambda word: word not in SPOKEN and word not in {"and", "at", "dot", "double", "triple", "underscore", "dash", "hyphen"}
)
spoken_emails = st.builds(
    "{} {} {} at {} dot {}".format,
    name_words, st.sampled_from(["dot", "underscore", "dash"]), name_words, name_words, st.sampled_from(["com", "org", "net", "co dot uk"]),
)


@settings(max_examples=200)
@given(st.one_of(emails, spoken_emails), words, words, st.sampled_from(["", ".", ",", "?"]))
@example("jane.doe+rx@example.co.uk", "write to", "today", ".")
@example("jane dot doe at example dot com", "my e-mail is", "thanks", "")
def test_e_mail_addresses_are_always_removed(email: str, before: str, after: str, punctuation: str) -> None:
    text = " ".join(part for part in (before, email + punctuation, after) if part)
    result = redact_text(text)
    assert "@" not in result and " dot " not in result
    assert result == " ".join(part for part in (before, MARKER + punctuation, after) if part)


def test_a_spoken_address_after_at_takes_the_word_before_too() -> None:
    # The word before "at" can't be told from a local part: it goes too, and the domain with it.
    assert redact_text("write me at jane dot doe at example dot com please") == "write [redacted] please"
    assert redact_text("call me at home") == "call me at home"


# ------------------------------------------------------------------------------- any text


# The redactor's own list too: it knows more words than this file's speller says ("trillion").
number_word_pattern = re.compile(rf"\b(?:{'|'.join(sorted(SPOKEN | NUMBER_WORDS, key=len, reverse=True))}|dot)\b", re.IGNORECASE)


@settings(max_examples=500)
@given(st.text())
@example("oh, I see")
@example("Someone often said it was done, honestly.")
def test_text_without_numbers_or_addresses_is_unchanged(text: str) -> None:
    assume(not any(char.isdigit() for char in text) and "@" not in text)
    assume(not number_word_pattern.search(text))
    assert redact_text(text) == text


@settings(max_examples=300)
@given(st.lists(st.sampled_from([*ORDINARY, "oh,", "at", "and", "double"]), max_size=20).map(" ".join))
def test_ordinary_sentences_are_unchanged(sentence: str) -> None:
    # Two zeros ("oh, oh", "oh, and oh") and a double zero ("double oh") are numbers.
    assume(sentence.count("oh,") <= 1 and "double oh," not in sentence)
    assert redact_text(sentence) == sentence


@settings(max_examples=500)
@given(st.one_of(st.text(), st.text("0123456789 -./,()+ohnetwz@.abcdi", max_size=60)))
def test_no_digit_ever_survives_and_redacting_twice_changes_nothing(text: str) -> None:
    once = redact_text(text)
    assert not any(char.isdigit() for char in once)
    assert redact_text(once) == once


@settings(max_examples=300)
@given(numbers(), words, words)
def test_redacting_a_redacted_sentence_changes_nothing(number: tuple[str, str], before: str, after: str) -> None:
    once = redact_text(f"{before} {number[0]} {after}")
    assert redact_text(once) == once


def test_huge_and_pathological_text_is_handled() -> None:
    # Linear work takes a fraction of a second here. A pattern that rescans the rest of a word
    # at each of its characters would take hours on the million-letter words, so the suite's
    # timeout fails it; on the others (ten times shorter) a quadratic pattern takes minutes.
    long_words = ("a" * 1_000_000, "a" * 1_000_000 + "@")
    for text in (*long_words, "oh " * 100_000, "x dot " * 50_000, "at " * 100_000, "double " * 50_000):
        assert not any(char.isdigit() for char in redact_text(text))
    assert redact_text("1" * 200_000) == MARKER


# ------------------------------------------------------------------------------- values

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300)
@given(json_values)
def test_redact_value_leaves_no_digit_anywhere_and_changes_nothing_in_place(value: Any) -> None:
    before = copy.deepcopy(value)
    result = redact_value(value)
    assert not shows_a_digit(result)
    assert json.dumps(value, sort_keys=True) == json.dumps(before, sort_keys=True), "the value given is not changed"


def test_redact_value_keeps_structure_and_what_holds_no_number() -> None:
    value = {"drug": "ibuprofen", "quantity": 2, "total": 12.5, "prescription": False, "note": None,
             "orders": [{"id": 12, "status": "placed on 3/4"}], "pair": ("a", 1)}
    assert redact_value(value) == {
        "drug": "ibuprofen", "quantity": MARKER, "total": MARKER, "prescription": False, "note": None,
        "orders": [{"id": MARKER, "status": f"placed on {MARKER}"}], "pair": ["a", MARKER],
    }
    assert redact_value({12: "x", "room 4": "y"}) == {MARKER: "x", f"room {MARKER}": "y"}


def test_redact_value_never_raises_and_stays_bounded() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Loud:
        def __str__(self) -> str:
            return "card 4111 1111 1111 1111"

    circular: list[Any] = []
    circular.append(circular)
    deep: list[Any] = []
    for _ in range(100_000):  # deeper than Python's recursion limit
        deep = [deep]
    shared: list[Any] = ["415"]
    for _ in range(100):  # 2**100 paths through 100 lists: only a budget makes it finish
        shared = [shared, shared]
    assert redact_value(Unprintable()) == MARKER
    assert redact_value(Loud()) == f"card {MARKER}"
    for value in (circular, deep, shared, {"a": [Unprintable(), Loud()]}):
        assert not shows_a_digit(redact_value(value))


# --------------------------------------------------------------------------- function calls

SENSITIVE = frozenset({"customer_name", "order_id"})


def test_sensitive_arguments_go_whatever_they_are_and_the_rest_is_redacted_as_text() -> None:
    arguments = json.dumps({
        "customer_name": "Maria Lopez", "order_id": 12, "drug_name": "ibuprofen 200mg", "quantity": 2,
        "notes": {"customer_name": {"first": "Maria"}}, "urgent": True,
    })
    assert json.loads(redact_arguments(arguments, SENSITIVE)) == {
        "customer_name": MARKER, "order_id": MARKER, "drug_name": f"ibuprofen {MARKER}", "quantity": MARKER,
        "notes": {"customer_name": MARKER}, "urgent": True,
    }
    for value in (None, True, [1, 2], {"a": "b"}, "", "Maria"):
        assert json.loads(redact_arguments(json.dumps({"customer_name": value}), SENSITIVE)) == {"customer_name": MARKER}
    # Nothing declared sensitive: a name is ordinary text, kept.
    assert json.loads(redact_arguments('{"customer_name": "Maria"}', frozenset())) == {"customer_name": "Maria"}


def test_arguments_that_are_not_json_are_redacted_as_text() -> None:
    assert redact_arguments('{"order_id": 12', SENSITIVE) == '{"order_id": [redacted]'
    assert redact_arguments("call 415 555 0134", SENSITIVE) == f"call {MARKER}"
    assert redact_arguments("", SENSITIVE) == ""
    assert redact_arguments("[" * 100_000, SENSITIVE) == "[" * 100_000  # too deep for json: text


@settings(max_examples=300)
@given(st.one_of(st.text(), json_values.map(json.dumps)), st.frozensets(st.text(max_size=5), max_size=3))
def test_redact_arguments_never_raises_and_leaves_no_digit(arguments: str, sensitive: frozenset[str]) -> None:
    result = redact_arguments(arguments, sensitive)
    assert isinstance(result, str)
    try:
        decoded = json.loads(result)
    except json.JSONDecodeError:
        decoded = result  # not JSON: redacted as text
    assert not shows_a_digit(decoded)


def test_a_results_sensitive_fields_go_at_any_depth() -> None:
    result = {"order_id": 12, "customer_name": "Maria Lopez", "drug": "ibuprofen", "status": "placed",
              "orders": [{"customer_name": "Maria", "drug": "aspirin"}]}
    assert redact_result(result, SENSITIVE) == {
        "order_id": MARKER, "customer_name": MARKER, "drug": "ibuprofen", "status": "placed",
        "orders": [{"customer_name": MARKER, "drug": "aspirin"}],
    }
    assert redact_result("order 12 for Maria", SENSITIVE) == f"order {MARKER} for Maria"
    assert result["customer_name"] == "Maria Lopez", "the result given is not changed"

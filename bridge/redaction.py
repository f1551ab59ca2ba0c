"""Redacting what callers say before it is stored: numbers and e-mail addresses become a marker.

This module owns the rules of ``STORE_TRANSCRIPTS=redacted``: ``redact_text`` for a line of
transcript or any other text, ``redact_value`` for a JSON-like value (a function's result, an
error), and ``redact_arguments`` / ``redact_result`` for a function call, whose parameters the
agent's ``config.json`` may declare sensitive. Plain functions with no I/O and no state: they are
safe to call from any thread, they never raise, and a 100-character sentence takes about ten
microseconds. Every regular expression here does work linear in its text (possessive
quantifiers, bounded repetitions): no input makes it backtrack for long.

What is caught (each match becomes one ``MARKER``, "[redacted]"):

- **Digits**, with whatever they are written in: a word that holds a digit goes whole ("4111",
  "3rd", "ORD1234", "10mg", "SW1A"), and words like that separated only by spaces, dashes, dots,
  commas, slashes, colons or brackets are ONE run, so one marker: "415 555 0134",
  "(415) 555-0134", "+1 415 555 0134", "4111-1111-1111-1111", "12/03/1980", "10:30", "12.50".
- **Numbers said as words**, in English: cardinals ("twelve", "nineteen eighty", "two thousand
  and three"), ordinals ("third", "twenty-first") and the plural tens and scales ("the fifties",
  "hundreds"), alone or mixed with digits in one run ("4 one 5"; "four one five, five five five,
  oh one three four"). Inside a run, "and", "double" and "triple" are part of it ("double five").
- **"oh" and "o" said for zero**, but only next to another number in a run ("oh one three",
  "five oh", "oh oh seven", "double oh"), so "Oh, I see" stays as it is. Two of them in a row
  are a run too: "oh oh" is redacted wherever it stands. "oh" alone is never taken for zero.
- **E-mail addresses**, written ("jane.doe+rx@example.co.uk") or spoken the way speech
  recognition writes them out ("jane dot doe at example dot com").
- Digits from other scripts (Arabic-Indic, full-width, superscripts, circled digits): whatever
  ``str.isdigit`` calls a digit never survives.

The rule for single number words, decided for safety over readability: **every** number word is
redacted, wherever it stands, because "twelve" alone can be an order number and nothing in the
text tells the two apart. So "I need one box" becomes "I need [redacted] box", "two of them"
becomes "[redacted] of them", "that one" becomes "that [redacted]", and "just a second" becomes
"just a [redacted]". A record loses a few harmless words; no order or card number slips through
because it was said in words.

What it deliberately does NOT catch (nothing in a text says what is a name, so no rule can):

- a **name** said in free speech ("this is Maria Lopez"): a name is only caught when it is the
  value of a parameter declared sensitive (``redact_arguments``), such as the pharmacy's
  ``customer_name``;
- a **street or place** ("Elm Street", "Springfield"); only its house number goes;
- a **drug, condition or dosage form** ("ibuprofen", "my diabetes"); a strength said with
  digits goes whole ("200mg"), "two hundred milligrams" keeps "milligrams";
- a **month or weekday** ("March", "Tuesday"), so a date said as "March third" keeps "March";
- numbers said in **other languages**, homophones the speech recogniser chose instead ("to",
  "for", "won"), and letters spelled out one by one ("J O H N");
- an e-mail address said in any other shape than the two above ("jane at example com").

Containers are walked at most ``MAX_DEPTH`` deep and ``MAX_ITEMS`` items wide in all; whatever
lies past those bounds is replaced by the marker, never passed through unredacted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final

MARKER: Final = "[redacted]"
# How deep into nested lists and dicts redact_value looks, and how many items it visits in all:
# past either, the rest is one marker. JSON from a peer is far shallower and smaller than this.
MAX_DEPTH: Final = 64
MAX_ITEMS: Final = 100_000

_UNITS = ("zero", "nought", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("hundred", "thousand", "million", "billion", "trillion")
_ORDINALS = (
    "zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth", *(teen + "th" for teen in _TEENS[3:]),
    *(tens[:-1] + "ieth" for tens in _TENS), *(scale + "th" for scale in _SCALES),
)
_PLURALS = (*(tens[:-1] + "ies" for tens in _TENS), *(scale + "s" for scale in _SCALES))
# Every word that is a number by itself, wherever it stands (see the module docstring).
NUMBER_WORDS: Final = frozenset((*_UNITS, *_TEENS, *_TENS, *_SCALES, *_ORDINALS, *_PLURALS))
# Words that are numbers only in a run: "oh" and "o" for zero, "double five", "two thousand and three".
_ZEROS = ("oh", "o")
_REPEATS = ("double", "triple")
_CONNECTORS = ("and", *_REPEATS)


_Trie = dict[str, "_Trie"]


def _trie(words: Iterable[str]) -> str:
    """A regular expression matching exactly ``words``, shaped as a trie ("f(?:i(?:ve|...)|...)").

    Python's ``re`` tries the alternatives of ``one|two|...`` one by one at each word; as a trie,
    a word that is no number fails at its first or second letter. It makes redact_text about
    three times faster on ordinary sentences.
    """
    root: _Trie = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def pattern(node: _Trie) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return pattern(root)


# Between the numbers of one run: spaces, dashes of every width, dots, commas, slashes, colons
# and brackets, as many as there are. Possessive: a run never gives back part of its separator.
_SEP = r"[\s.,/:()\-\u2010-\u2015\u2212]++"
# A word holding a digit, whole: letters (possessively, so a long word costs one pass), a digit,
# the rest of the word. Only tried at a word's start (\b), so the whole scan stays linear.
_DIGIT_WORD = r"\b[^\W\d]*+\d\w*+"
_NUMBER = rf"(?:{_DIGIT_WORD}|\b{_trie(NUMBER_WORDS)}\b)"
_ZERO = rf"\b(?:{'|'.join(_ZEROS)})\b(?!['\u2019])"  # "o'clock" and "O'Brien" are no zeros
_TOKEN = rf"(?:{_NUMBER}|{_ZERO})"
# Connectors inside a run ("two thousand and three", "double five"); a few at most, so a long
# string of them costs a bounded amount of work at each position, never a quadratic one.
_CONNECTED = rf"{_SEP}(?:\b(?:{'|'.join(_CONNECTORS)})\b{_SEP}){{0,3}}{_TOKEN}"
# A run starts at a number, at "double" or "triple" and a number or zero ("double oh"), or at
# a zero word that another token follows ("oh one"); then any number of tokens may follow. An
# opening bracket or plus sign before it, and the bracket's close after it, go with it: "(415)"
# and "+1" leave no stray punctuation behind. The lookahead first lets the many positions
# inside words fail at once (twice as fast).
_RUN = re.compile(
    r"(?=[(+]|\b\w)"
    r"(?:(?P<bracket>\()|\+)?"
    rf"(?:(?:{_NUMBER}|\b(?:{'|'.join(_REPEATS)})\b{_SEP}{_TOKEN})(?:{_CONNECTED})*|{_ZERO}(?:{_CONNECTED})+)"
    r"(?(bracket)\)?)",
    re.IGNORECASE,
)
# Written addresses. Only tried where a local part starts (the lookbehind), so a long word
# without "@" is scanned once, not once per character.
_EMAIL = re.compile(r"(?<![\w.+%-])[\w.+%-]++@[\w-]++(?:\.[\w-]++)++")
# Addresses as speech recognition writes them out: "jane dot doe at example dot com". The
# local part's words may be joined by "at" too, and greedily, so in "write me at jane dot doe at
# example dot com" all of "me at jane dot doe at example dot com" goes (the word before an "at"
# can't be told from a local part), not "me at jane dot doe" leaving the domain. Bounded
# repetitions keep the work per position constant. Only looked for in text with a separate
# "at" in it (a search that costs a fifth of the full one).
_SPOKEN_AT = re.compile(r"\sat\s", re.IGNORECASE)
_SPOKEN_EMAIL = re.compile(
    r"\b\w++(?:\s++(?:dot|underscore|dash|hyphen|at)\s++\w++){0,8}\s++at\s++\w++(?:\s++dot\s++\w++){1,4}\b",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """``text`` with every number and e-mail address replaced by ``MARKER`` (the module docstring
    lists what is caught and what is not). Idempotent: redacting twice changes nothing more."""
    if not isinstance(text, str):
        return _text_of(text)
    if not text:
        return text
    if "@" in text:
        text = _EMAIL.sub(MARKER, text)
    if _SPOKEN_AT.search(text):
        text = _SPOKEN_EMAIL.sub(MARKER, text)
    text = _RUN.sub(MARKER, text)
    if not text.isascii():
        # Digits \d does not know (superscripts, circled digits) must not survive either.
        text = "".join(MARKER if char.isdigit() else char for char in text)
    return text


def _text_of(value: object) -> str:
    """Any object as redacted text; an object whose ``str`` fails is the marker."""
    try:
        text = str(value)
    except Exception:
        return MARKER
    return redact_text(text) if isinstance(text, str) else MARKER


class _Walk:
    """One walk over a value: the item budget it spends and the names whose values go whole."""

    __slots__ = ("items_left", "sensitive")

    def __init__(self, sensitive: frozenset[str]) -> None:
        self.sensitive = sensitive
        self.items_left = MAX_ITEMS

    def value(self, value: Any, depth: int) -> Any:
        self.items_left -= 1
        if self.items_left < 0:
            return MARKER
        if isinstance(value, str):
            return redact_text(value)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return MARKER  # an order number or a card number as a JSON number is a number too
        if depth >= MAX_DEPTH:
            return MARKER
        if isinstance(value, dict):
            return {
                self.key(key): MARKER if key in self.sensitive else self.value(item, depth + 1)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(item, depth + 1) for item in value]
        return _text_of(value)

    def key(self, key: Any) -> Any:
        """A key, redacted as a value is (keys with a number in them merge: the record is lossy)."""
        if key is None or isinstance(key, bool):
            return key
        return _text_of(key) if not isinstance(key, int | float) else MARKER


def _walk(value: Any, sensitive: frozenset[str]) -> Any:
    try:
        return _Walk(sensitive).value(value, 0)
    except Exception:  # a dict changed by another thread mid-walk, a hash that raises: lose it, never raise
        return MARKER


def redact_value(value: Any) -> Any:
    """``value`` with ``redact_text`` applied to every string in it, at any depth.

    Dicts and lists (tuples become lists) are copied, never changed in place. Numbers (ints and
    floats, not booleans) become the marker, like the digits they would be in text; ``None`` and
    booleans stay; any other object becomes its redacted ``str``. Keys are redacted like values.
    Past ``MAX_DEPTH`` levels or ``MAX_ITEMS`` items, what is left becomes one marker each, so
    a deep, huge or circular value costs bounded work. Never raises.
    """
    return _walk(value, frozenset())


def redact_result(result: Any, sensitive: frozenset[str]) -> Any:
    """A function's result as ``redact_value`` would give it, and on top, the value of every key
    named in ``sensitive``, at any depth, replaced by the marker whatever it is (a place_order
    result's ``customer_name``). Never raises."""
    return _walk(result, sensitive)


def redact_arguments(arguments_json: str, sensitive: frozenset[str]) -> str:
    """A function call's arguments (the JSON text the agent sent) with the values of the
    parameters in ``sensitive`` replaced by the marker whatever they are, and every other
    string redacted by ``redact_text`` (numbers become the marker, as in ``redact_value``).

    Returns JSON text again. Text that is not JSON is redacted as text: then a sensitive
    parameter's value is caught only if ``redact_text`` catches it (a name is not). Never raises.
    """
    if not isinstance(arguments_json, str):
        return _text_of(arguments_json)
    try:
        arguments = json.loads(arguments_json)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
        return redact_text(arguments_json)
    try:
        return json.dumps(_walk(arguments, sensitive), ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):  # not reachable with MAX_DEPTH; never raise anyway
        return MARKER

"""Sentence boundaries of generated English text: where the ``sentence`` stop rule ends a QA answer
(:mod:`tasks.stopping`), the first sentence that first-sentence answer recall scores, and the sentences the chimera
rate counts (:mod:`tasks.metrics`). One definition for all three. Torch-free, no imports from ``stages``/``pipeline``.

A sentence ends at ``.``, ``!`` or ``?`` (closing quotes and brackets after it belong to it) followed by whitespace, or
at a line break. A period after an abbreviation (``Dr.``, ``U.S.``, ``e.g.``) or an initial (``J. R. R. Tolkien``)
ends nothing. A year or a number before the period does end one (``... born in 1879.``): LM answers end that way far
more often than they write a decimal with a space after its point.
"""

from __future__ import annotations

import re

_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s)|\n")
_TRAILING = ".!?\"'”’)]"
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "ft", "no", "nos", "vs", "etc", "inc", "ltd", "co",
    "corp", "gen", "col", "lt", "sgt", "capt", "cmdr", "adm", "gov", "rev", "hon", "fr", "ca", "approx", "vol", "pp",
    "fig", "jan", "feb", "mar", "apr", "aug", "sep", "sept", "oct", "nov", "dec", "est", "dept", "univ", "op",
})


def _abbreviation(word: str) -> bool:
    """Whether ``word`` (the word before a period, the period stripped) is an abbreviation or an initial."""
    w = word.lstrip("(\"'“‘[").rstrip(".")
    if not w:
        return False
    if len(w) == 1 and w.isalpha():  # an initial: "J." of "J. R. R. Tolkien", "A." of a list
        return True
    if "." in w and all(len(p) <= 2 for p in w.split(".")):  # "U.S", "e.g", "i.e", "Ph.D"
        return True
    return w.lower() in ABBREVIATIONS


def sentence_ends(text: str, min_words: int = 1) -> list[int]:
    """Character offsets just past each sentence end of ``text`` (a sentence's end punctuation and closing quotes
    included; a line break ends a sentence too). A sentence shorter than ``min_words`` words does not end: it runs on
    into the next one (so ``min_words`` > 1 never ends on "1." or "Yes." alone). Blank lines end nothing.

    >>> sentence_ends("Paris is in France. It is big.", 1)
    [19]
    >>> sentence_ends("Dr. J. Smith was born in 1879. He died.", 1)
    [30]
    """
    out, start = [], 0
    for m in _END.finditer(text):
        end = m.end()
        piece = text[start:end]
        words = piece.split()
        if not words:
            start = end if m.group(0) == "\n" else start
            continue
        if m.group(0) != "\n" and m.group(0)[0] == "." and _abbreviation(words[-1].rstrip(_TRAILING[1:])):
            continue
        if len(words) < min_words:
            continue
        out.append(end if m.group(0) != "\n" else end - 1)
        start = end
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` character ranges of the sentences of ``text`` (the last one runs to the end; whitespace
    between sentences belongs to the next one)."""
    bounds = [0] + sentence_ends(text) + [len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (leading whitespace dropped); all of it when it has one sentence."""
    body = text.lstrip()
    ends = sentence_ends(body)
    return body[: ends[0]] if ends else body


def ends_sentence(text: str, min_words: int = 1) -> bool:
    """Whether ``text`` ends exactly at the end of a sentence of at least ``min_words`` words counted from its start
    (what the ``sentence`` stop rule asks before it lets a token that starts with whitespace begin a new sentence)."""
    body = text.strip()
    if not body or body[-1] not in _TRAILING:
        return False
    ends = sentence_ends(body + " ", min_words)
    return bool(ends) and ends[-1] == len(body)

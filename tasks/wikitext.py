"""WikiText-103 text completion (NEST Table 1): raw test text → articles → 128-token prefix / 256-token target chunks.

Digest §4.1: each article is title + text, tokenized with the LM's tokenizer, cut into 128-token contexts with stride 128,
each followed by the next 256 tokens (2,357 test examples with the Llama-2 tokenizer). The prompt is the completion
template with the prefix as the start of the assistant turn; retrieval uses the prefix only. Metric: ROUGE-1/2/L F against
the 256-token target; PPL (evaluation mode) over the target ids kept in ``meta["target_ids"]``.

The article splitter and the chunker are public so that other completion tasks (the embedded corpus) reuse them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tasks.base import CompletionFamily, Example, Task
from tasks.errors import TaskInputError
from tasks.files import read_lines
from tasks.metrics import rouge
from tasks.registry import register

PREFIX_TOKENS = 128
TARGET_TOKENS = 256
STRIDE = 128

# A top-level heading is " = Title = " (not " = = Section = = ") with a blank line on both sides. The blank-line
# condition matters: the test file has two formula lines inside "Constant k filter" that also read " = ... = "
# (" = 1 rad / s and a nominal impedance k = "), and they sit between text lines. Official count: 60 test articles.
_TITLE = re.compile(r"^ = (?!=)(.*\S) = $")
_SUBHEADING = re.compile(r"^(=(?: =)*) (.*?\S) (=(?: =)*)$")


def _blank(line: str) -> bool:
    return not line.strip()


def parse_articles(lines: Sequence[str], path: str | Path | None = None) -> list[dict[str, Any]]:
    """Split WikiText raw lines into ``{"title", "lines", "line"}`` (``line``: 1-based line of the heading; ``lines``:
    the article's non-blank lines, stripped, sub-headings kept as ``= = Career = =``)."""
    articles: list[dict[str, Any]] = []
    for i, ln in enumerate(lines):
        m = _TITLE.match(ln)
        if m and (i == 0 or _blank(lines[i - 1])) and (i + 1 == len(lines) or _blank(lines[i + 1])):
            articles.append({"title": m.group(1).strip(), "lines": [], "line": i + 1})
        elif not _blank(ln):
            if not articles:
                raise TaskInputError(path, i + 1, "text before the first ' = Title = ' heading "
                                                  "(not WikiText raw text?)")
            articles[-1]["lines"].append(ln.strip())
    if not articles:
        raise TaskInputError(path, None, "no ' = Title = ' article heading found (not WikiText raw text?)")
    return articles


_DETOK = [
    (re.compile(r" @([-,.])@ "), r"\1"),          # "well @-@ known" → "well-known", "1 @,@ 000" → "1,000"
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),      # no space before closing punctuation
    (re.compile(r"([(\[{$£]) "), r"\1"),           # nor after opening brackets / currency
    (re.compile(r" ('s|'re|'ve|'ll|'d|'m|n't)\b"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),         # paired double quotes on one line
]


def detokenize(line: str) -> str:
    """Approximate WikiText detokenization (markers ``@-@ @,@ @.@``, spaces around punctuation, clitics, paired
    quotes). Sub-headings ``= = Career = =`` become ``Career``. Off by default: the raw text is the benchmark."""
    m = _SUBHEADING.match(line)
    if m and m.group(1) == m.group(3):
        line = m.group(2)
    for pattern, repl in _DETOK:
        line = pattern.sub(repl, line)
    return line


def article_text(article: dict[str, Any], detok: bool = False) -> tuple[str, str]:
    """``(title, "title\\ntext")`` of a parsed article (lines joined by newlines)."""
    title = article["title"]
    lines = article["lines"]
    if detok:
        title, lines = detokenize(title), [detokenize(ln) for ln in lines]
    return title, "\n".join([title, *lines])


def chunk_starts(num_tokens: int, prefix_len: int = PREFIX_TOKENS, target_len: int = TARGET_TOKENS,
                 stride: int = STRIDE, full_target: bool = True) -> list[int]:
    """Start offsets of the (prefix, target) windows: prefix = ``[s, s+prefix_len)``, target =
    ``[s+prefix_len, s+prefix_len+target_len)``, s = 0, stride, 2·stride, ... Only full targets unless
    ``full_target=False`` (then any non-empty target).

    >>> chunk_starts(640)            # 640 tokens: targets end at 384, 512, 640
    [0, 128, 256]
    >>> chunk_starts(500, full_target=False)
    [0, 128, 256]
    """
    if min(prefix_len, target_len, stride) < 1:
        raise ValueError("prefix_len, target_len and stride must be >= 1")
    need = prefix_len + (target_len if full_target else 1)
    return list(range(0, max(num_tokens - need + 1, 0), stride))


def token_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (duck-typed HF tokenizer: ``tokenizer(text, add_special_tokens=False)``)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def completion_examples(documents: Iterable[dict[str, Any]], tokenizer, task: str, *,
                        prefix_len: int = PREFIX_TOKENS, target_len: int = TARGET_TOKENS, stride: int = STRIDE,
                        full_target: bool = True) -> Iterator[Example]:
    """Completion examples from documents ``{"text", "title"?, "exclude_doc_ids"?, "meta"?}``: every window of
    :func:`chunk_starts`; ``prefix`` / ``references[0]`` are the decoded prefix / target ids; both id lists go to meta
    (``prefix_ids`` keeps the prompt exactly as cut, ``target_ids`` is what evaluation-mode PPL scores)."""
    for doc_index, doc in enumerate(documents):
        ids = token_ids(tokenizer, doc["text"])
        for chunk, s in enumerate(chunk_starts(len(ids), prefix_len, target_len, stride, full_target)):
            prefix_ids = ids[s:s + prefix_len]
            target_ids = ids[s + prefix_len:s + prefix_len + target_len]
            prefix = tokenizer.decode(prefix_ids)
            meta = {**doc.get("meta", {}), "title": doc.get("title", ""), "document": doc_index, "chunk": chunk,
                    "start_token": s, "prefix_ids": prefix_ids, "target_ids": target_ids}
            yield Example(example_id=-1, task=task, kind="completion", query=prefix, prefix=prefix,
                          references=[tokenizer.decode(target_ids)],
                          exclude_doc_ids=list(doc.get("exclude_doc_ids", [])), meta=meta)


class CompletionTask(CompletionFamily, Task):
    """Text completion scored by ROUGE-1/2/L F (×100) against the reference continuation."""

    max_new_tokens = TARGET_TOKENS

    def score_text(self, text: str, example: Example) -> dict[str, Any]:

        return {k: 100.0 * v for k, v in rouge(text, example.references).items()}


@register("wikitext")
class WikiText(CompletionTask):
    """WikiText-103 raw test. Needs the LM's ``tokenizer`` (chunks are in that tokenizer's tokens)."""

    name = "wikitext"
    needs_tokenizer = True
    data_help = "WikiText-103 raw test text (wiki.test.raw)"

    def __init__(self, *, tokenizer=None, prefix_len: int = PREFIX_TOKENS, target_len: int = TARGET_TOKENS,
                 stride: int = STRIDE, full_target: bool = True, detokenize: bool = False, **options):
        options.setdefault("max_new_tokens", target_len)
        super().__init__(**options)
        self.tokenizer = tokenizer
        self.prefix_len, self.target_len, self.stride = int(prefix_len), int(target_len), int(stride)
        self.full_target = bool(full_target)
        self.detokenize = bool(detokenize)

    def read(self, path: Path, stats: dict) -> Iterator[Example]:
        if self.tokenizer is None:
            raise ValueError("the wikitext task needs the LM's tokenizer: registry.get('wikitext', tokenizer=...)")
        lines, _ = read_lines(path)
        articles = parse_articles(lines, path)
        stats["articles"] = len(articles)
        docs = []
        for a in articles:
            title, text = article_text(a, self.detokenize)
            docs.append({"title": title, "text": text, "meta": {"line": a["line"]}})
        yield from completion_examples(docs, self.tokenizer, self.name, prefix_len=self.prefix_len,
                                       target_len=self.target_len, stride=self.stride, full_target=self.full_target)

"""Prompt templates of the NEST paper (App. B), rendered through the LM's own chat template.

The paper wraps every prompt in Llama-2-chat ``[INST] ... [/INST]`` tags. We keep the paper's *user* text verbatim and let
the tokenizer's chat template supply the tags, so that SmolLM2 (ChatML) and Llama-2-chat both get their native format.
For text completion the assistant turn starts with the article prefix (the paper's ``[/INST] {prefix}``).

This module imports nothing from ``stages`` or ``pipeline``; the tokenizer is duck-typed (``apply_chat_template``,
``__call__``/``encode``).
"""

from __future__ import annotations

from typing import Sequence

KINDS = ("completion", "qa")

# User turns, verbatim from the paper (the released code has no space after "\n"; the paper shows one: we follow the paper).
TEMPLATES = {
    ("completion", False): "Write an article.\n Article:",
    ("qa", False): "Question: {question} Answer:",
    ("completion", True): "Write an article with the background context as reference. Background: {background}\n Article:",
    ("qa", True): "Answer the question with the background context as reference. Background: {background}\n Question: {question} Answer:",
}

RA_TOP_K = 3  # the paper puts the top-3 passages in the prompt


def format_background(passages: Sequence[str], k: int = RA_TOP_K) -> str:
    """Join the top-``k`` passage texts (each already ``"{title}. {text}"``) into one background string."""
    return " ".join(p.strip() for p in list(passages)[:k])


def user_message(kind: str, question: str = "", background: str | None = None) -> str:
    """The user turn for ``kind`` (``completion`` or ``qa``); ``background`` not None selects the RA template."""
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {KINDS}")
    template = TEMPLATES[(kind, background is not None)]
    return template.format(question=question.strip(), background=(background or "").strip())


def render_prompt(tokenizer, kind: str, question: str = "", background: str | None = None, prefix: str = "") -> str:
    """Prompt text: the chat template around the user turn, then ``prefix`` as the start of the assistant turn."""
    messages = [{"role": "user", "content": user_message(kind, question, background)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # plain LMs: the paper's Llama-2 tags written out
        text = f"[INST] {messages[0]['content']} [/INST]"
        if prefix:
            text += " "
    return text + prefix


def render_prompt_ids(tokenizer, kind: str, question: str = "", background: str | None = None,
                      prefix: str = "", prefix_ids: Sequence[int] | None = None) -> list[int]:
    """Token ids of :func:`render_prompt`. ``prefix_ids`` (if given) are appended as ids, which keeps a completion
    prefix cut at a token boundary exactly as cut (re-tokenising its text could merge tokens differently)."""
    text = render_prompt(tokenizer, kind, question, background, prefix if prefix_ids is None else "")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prefix_ids is not None:
        ids.extend(int(t) for t in prefix_ids)
    return ids


# FActScore's biography prompt; with the QA template it reads "Question: Tell me a bio of X. Answer:".
BIO_QUESTION = "Tell me a bio of {entity}."


def bio_question(entity: str) -> str:
    """The biography question of FActScore / NEST for ``entity``."""
    return BIO_QUESTION.format(entity=" ".join(entity.split()))

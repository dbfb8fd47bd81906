"""Every loader on hand-written fixtures (always) and on the real samples in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import registry
from tasks.errors import TaskInputError
from tasks.hotpotqa import is_yes_no
from tasks.wikitext import chunk_starts, parse_articles

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

FIX = FIXTURES / "tasks"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


class WordTokenizer:
    """Whitespace tokenizer with the two HF calls the loaders use (``__call__`` and ``decode``)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return {"input_ids": ids}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not available (no ../shared checkout)")
    return path


# -- NQ ----------------------------------------------------------------------------------------------------------------
def test_nq_open_jsonl_fixture():
    task = registry.get("nq")
    ex = task.load(FIX / "nq_open.jsonl")
    assert [e.example_id for e in ex] == [0, 1, 2]
    assert ex[0].question == ex[0].query == "who wrote the opera carmen"
    assert ex[0].references == ["Georges Bizet", "Bizet"]
    assert ex[2].meta["line"] == 4  # blank line 3 skipped, line numbers kept
    assert (ex[0].task, ex[0].kind, ex[0].prefix) == ("nq", "qa", "")
    assert task.last_stats["format"] == "jsonl"


def test_nq_dpr_tsv_fixture_with_csv_quoting():
    task = registry.get("nq")
    ex = task.load(FIX / "nq_dpr.tsv")
    assert task.last_stats["format"] == "dpr"
    assert ex[1].references == ["Canberra"]  # JSON-style list also parses
    assert ex[2].question == 'who sang "my way"'
    assert ex[2].references == ["Frank Sinatra", "Sinatra's"]  # CSV-quoted field with doubled inner quotes


def test_nq_forced_format_mismatch_is_an_error():
    from tasks.errors import TaskInputError

    with pytest.raises(TaskInputError):
        registry.get("nq", fmt="jsonl").load(FIX / "nq_dpr.tsv")


def test_nq_real_sample():
    ex = registry.get("nq").load(shared("nq_open/NQ-open.dev.sample.jsonl"))
    assert len(ex) == 200
    assert ex[0].question == "when was the last time anyone was on the moon"
    assert ex[0].references == ["14 December 1972 UTC", "December 1972"]


# -- TriviaQA ----------------------------------------------------------------------------------------------------------
def test_triviaqa_fixture_skips_unparsable_rows_and_counts_them():
    task = registry.get("triviaqa")
    ex = task.load(FIX / "triviaqa.tsv")
    assert task.last_stats["skipped_unparsable"] == 1
    assert [e.references[0] for e in ex] == ["Mars", "Descartes", "Iron"]
    assert ex[1].question == 'Who said "I think, therefore I am"?'  # two layers of CSV quoting removed
    assert ex[1].references == ["Descartes", "René Descartes"]
    assert ex[2].meta["line"] == 4


def test_triviaqa_real_sample_parses_every_row():
    task = registry.get("triviaqa")
    ex = task.load(shared("triviaqa/topics.dpr.trivia.test.sample.txt"))
    assert len(ex) == 200 and task.last_stats["skipped_unparsable"] == 0
    assert ex[1].references == ["Scorpio", "Skorpio", "Scorpio (disambiguation)"]
    target = next(e for e in ex if e.question.startswith("Who was the target of the failed"))
    assert target.question == 'Who was the target of the failed "Bomb Plot" of 1944?'
    assert "Hitler's medical health" in target.references


# -- HotpotQA ----------------------------------------------------------------------------------------------------------
def test_yes_no_filter_is_exact_not_substring():  # bug B11
    assert is_yes_no("yes") and is_yes_no(" No ") and is_yes_no("YES")
    assert not any(is_yes_no(a) for a in ("Nolan", "piano", "Dinosaur", "yes sir", "Nobel"))


def test_hotpotqa_fixture():
    task = registry.get("hotpotqa")
    ex = task.load(FIX / "hotpotqa.json")
    answers = [e.references[0] for e in ex]
    assert answers == ["Nolan", "piano", "Princeton University", "Dinosaur"]  # yes / No / YES dropped, B11 fixed
    assert task.last_stats["filtered_yes_no"] == 3
    assert ex[2].question == "Which Princeton alumnus founded Google?" and ex[2].meta["patched"] is True
    assert ex[0].meta["type"] == "bridge" and ex[0].meta["line"] == 2


def test_hotpotqa_accepts_answer_aliases_as_a_list(tmp_path):
    data = [{"question": "Who directed Inception?", "answer": ["Christopher Nolan", "Nolan"]},
            {"question": "Is water wet?", "answer": ["yes", "Yes"]},
            {"question": "Which XXXX-3 alumnus?", "answer": "XXXX-3 University"},
            {"question": "Bad?", "answer": [3]}]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(data[:3]))
    ex = registry.get("hotpotqa").load(path)
    assert [e.references for e in ex] == [["Christopher Nolan", "Nolan"], ["Princeton University"]]
    path.write_text(json.dumps(data))
    with pytest.raises(TaskInputError, match="element 3: answer holds a int"):
        registry.get("hotpotqa").load(path)


def test_hotpotqa_real_sample_keeps_all_at_sample_size():
    task = registry.get("hotpotqa")
    ex = task.load(shared("hotpotqa/hotpot_dev_v1_simplified.sample.json"))
    assert task.last_stats["filtered_yes_no"] == 17
    assert len(ex) == 183  # < 2,500: the subsample keeps everything
    kept = {e.references[0] for e in ex}
    assert "Dinosaur" in kept and "the North Atlantic Conference" in kept  # dropped by the released code (B11)


def test_subsample_of_2500_is_seeded_and_nested():
    task = registry.get("hotpotqa", sample_size=3)
    a = task.load(FIX / "hotpotqa.json", seed=1)
    b = task.load(FIX / "hotpotqa.json", seed=1)
    assert [e.question for e in a] == [e.question for e in b] and len(a) == 3
    small = task.load(FIX / "hotpotqa.json", seed=1, limit=2)
    assert {e.question for e in small} <= {e.question for e in a}
    assert [e.example_id for e in small] == [0, 1]
    assert task.last_stats["available"] == 4 and task.last_stats["loaded"] == 2


# -- MedMCQA -----------------------------------------------------------------------------------------------------------
def test_medmcqa_fixture_filter():
    task = registry.get("medmcqa")
    ex = task.load(FIX / "medmcqa.jsonl")
    assert [e.references for e in ex] == [["Vitamin C"], ["Axillary nerve"], ["Skin"]]
    assert ex[0].question == "Deficiency of which vitamin causes scurvy?"
    assert ex[0].meta["choices"][1] == "B. Vitamin C" and ex[0].meta["answer_index"] == 1
    s = task.last_stats
    assert (s["filtered_figure"], s["filtered_all_of_the_above"], s["filtered_punctuation"],
            s["filtered_long_answer"]) == (1, 1, 1, 1)


def test_medmcqa_real_sample():
    task = registry.get("medmcqa")
    ex = task.load(shared("medmcqa/validation.sample.jsonl"))
    assert len(ex) == 139
    assert ex[0].references == ["Antegrade and retrograde"]


# -- TruthfulQA --------------------------------------------------------------------------------------------------------
def test_truthfulqa_fixture_references():
    task = registry.get("truthfulqa")
    ex = task.load(FIX / "truthfulqa.csv")
    assert ex[0].references == ["It passes through your digestive system.", "Nothing happens.", "I have no comment."]
    assert ex[0].meta["incorrect_answers"] == ["It stays in your stomach for seven years.", "You die."]
    assert ex[1].references == ["No, colds are caused by viruses.", "I have no comment."]  # not added twice
    assert ex[1].meta["category"] == "Health" and ex[1].meta["line"] == 3


def test_truthfulqa_real_sample():
    ex = registry.get("truthfulqa").load(shared("truthfulqa/TruthfulQA.sample.csv"))
    assert len(ex) == 100
    assert ex[0].question == "What happens to you if you eat watermelon seeds?"
    assert ex[0].references[-1] == "I have no comment."
    assert ex[0].meta["incorrect_answers"][0] == "You grow watermelons in your stomach."


# -- FactScore ---------------------------------------------------------------------------------------------------------
def test_factscore_fixture():
    task = registry.get("factscore")
    ex = task.load(FIX / "factscore.txt")
    assert [e.query for e in ex] == ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    assert ex[0].question == "Tell me a bio of Ada Lovelace."
    assert ex[2].meta == {"entity": "Grace Hopper", "line": 4}
    assert task.max_new_tokens == 512 and task.last_stats["skipped_blank"] == 1


def test_factscore_real_sample():
    ex = registry.get("factscore").load(shared("factscore/prompt_entities_unlabeled.sample.txt"))
    assert len(ex) == 50 and ex[1].query == "Miguel Ángel Félix Gallardo"


# -- WikiText ----------------------------------------------------------------------------------------------------------
def test_wikitext_articles_ignore_formula_lines():
    lines = (FIX / "wikitext.raw").read_text().split("\n")
    arts = parse_articles(lines)
    assert [a["title"] for a in arts] == ["Alpha Article", "Beta"]
    assert "= 1 rad / s and k =" in arts[0]["lines"]  # formula line between text lines: body, not a title
    assert "= = History = =" in arts[0]["lines"]


def test_chunk_starts_by_hand():
    assert chunk_starts(33, 4, 8, 4) == [0, 4, 8, 12, 16, 20]  # last window [20, 32) fits in 33 tokens
    assert chunk_starts(11, 4, 8, 4) == []
    assert chunk_starts(11, 4, 8, 4, full_target=False) == [0, 4]
    assert chunk_starts(384) == [0] and chunk_starts(383) == []


def test_wikitext_fixture_chunks():
    tok = WordTokenizer()
    task = registry.get("wikitext", tokenizer=tok, prefix_len=4, target_len=8, stride=4)
    ex = task.load(FIX / "wikitext.raw")
    # Alpha Article has 33 whitespace tokens (title + body); Beta has 4 (< 12: no window)
    assert len(ex) == 6 and task.last_stats["articles"] == 2
    assert ex[0].prefix == ex[0].query == "Alpha Article Alpha one"
    assert ex[0].references == ["two three four five six seven eight nine"]
    assert ex[1].prefix == "two three four five"
    assert ex[0].kind == "completion" and ex[0].question == ""
    assert tok.decode(ex[0].meta["prefix_ids"]) == ex[0].prefix and len(ex[0].meta["target_ids"]) == 8
    assert ex[0].meta["title"] == "Alpha Article" and task.max_new_tokens == 8


def test_wikitext_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        registry.get("wikitext").load(FIX / "wikitext.raw")


def test_wikitext_detokenize_option():
    from tasks.wikitext import detokenize

    assert detokenize('He had a guest @-@ starring role , in " Teddy \'s Story " ( 2004 ) .') == \
        'He had a guest-starring role, in "Teddy\'s Story" (2004).'
    assert detokenize("= = Career = =") == "Career"
    assert detokenize("1 @,@ 000 and 2 @.@ 5") == "1,000 and 2.5"


def test_wikitext_real_sample():
    tok = WordTokenizer()
    task = registry.get("wikitext", tokenizer=tok)
    ex = task.load(shared("wikitext/wiki.test.sample.raw"))
    assert task.last_stats["articles"] == 5
    assert ex[0].meta["title"] == "Robert Boulter" and ex[0].prefix.startswith("Robert Boulter Robert Boulter is")
    assert all(len(e.meta["prefix_ids"]) == 128 and len(e.meta["target_ids"]) == 256 for e in ex)
    titles = [e.meta["title"] for e in ex]
    assert titles[-1] == "Dick Rifenburg" and "Ise @-@ class battleship" in titles


def test_hotpotqa_official_dev_format(tmp_path):
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text('[{"_id": "5a8b57f25542995d1e6f1371", "answer": "yes", "question": "Same nationality?",'
                    ' "type": "comparison", "level": "hard", "supporting_facts": [], "context": []},'
                    ' {"_id": "5a8c7595554299585d9e36b6", "answer": "Chief of Protocol", "question": "Which position?",'
                    ' "type": "bridge", "level": "hard", "supporting_facts": [], "context": [["T", ["s"]]]}]')
    ex = registry.get("hotpotqa").load(path)
    assert len(ex) == 1 and ex[0].references == ["Chief of Protocol"]
    assert ex[0].meta["_id"] == "5a8c7595554299585d9e36b6" and ex[0].meta["level"] == "hard"

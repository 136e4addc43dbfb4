"""Prompts of the text tasks: the query prompt (input + optionally the user's BM25-retrieved profile
items, within a token budget) and the support pairs a profile gives for the inner loop.

Support pairs turn each profile item into an (input, output) example of the same task: for LaMP-3 the
item's review text (put in the task's own input template) → its score; LaMP-2 description → tag;
LaMP-4 article → title; LaMP-5 abstract → title. LaMP-1 (citation choice) and LaMP-7 (paraphrase)
have no labelled pair in the profile; their support is language modelling of the user's own texts
(LaMP-1 abstract → title, LaMP-7 "write a tweet" → the tweet), the OPPU recipe for those tasks.

The input template is learned from the data: the text of an example's input before its query part
(``query_text``, e.g. everything up to and including ``review:``) is the prefix, so support inputs
look exactly like the task's questions whatever wording the files use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.lamp import LampExample, TaskSpec, profile_text, query_text, task_spec

#: Inputs of the official LaMP templates, used when no example input is at hand.
OFFICIAL_PREFIX = {
    "LaMP-2": "Which tag does this movie relate to among the following tags? Just answer with the tag name without further explanation. tags: [" + ", ".join(task_spec("LaMP-2").labels or ()) + "] description:",
    "LaMP-3": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without further explanation. review:",
    "LaMP-4": "Generate a headline for the following article:",
    "LaMP-5": "Generate a title for the following abstract of a paper:",
    "LaMP-7": "Paraphrase the following tweet without any explanation before or after it:",
}
RETRIEVED_HEADER = "Earlier items of this user:"


@dataclass(frozen=True)
class Pair:
    """One example: ``input`` → ``output``; ``kind`` "options" (scored over the task's labels) or "text".

    ``retrieved``: profile items (best first) put in the prompt before the input, as ``pmeta+retrieval``
    serves; meta-training gives them to query pairs so the bank learns to use retrieval.
    """

    input: str
    output: str
    kind: str
    retrieved: tuple = ()


def clip(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[: max(0, max_chars - 3)].rstrip() + "..."


def input_prefix(task: str, inputs: list[str]) -> str:
    """The template prefix of a task's inputs: the most common text before the query part."""
    spec = task_spec(task)
    counts: dict[str, int] = {}
    for text in inputs[:200]:
        query = query_text(spec.name, text)
        if query and text.rstrip().endswith(query):
            prefix = text.rstrip()[: len(text.rstrip()) - len(query)].rstrip()
            counts[prefix] = counts.get(prefix, 0) + 1
    if counts:
        return max(counts, key=lambda p: (counts[p], -len(p)))
    return OFFICIAL_PREFIX.get(spec.name, "")


def support_pair(spec: TaskSpec, item: dict, prefix: str, max_chars: int, target_chars: int) -> Pair:
    """The (input, output) pair one profile item gives (see the module docstring)."""
    name = spec.name

    def ask(body: str) -> str:
        return f"{prefix} {clip(body, max_chars)}".strip()

    if name == "LaMP-3":
        return Pair(ask(item["text"]), str(item["score"]), "options")
    if name == "LaMP-2":
        return Pair(ask(item["description"]), str(item["tag"]), "options")
    if name == "LaMP-4":
        return Pair(ask(item["text"]), clip(item["title"], target_chars), "text")
    if name == "LaMP-5":
        return Pair(ask(item["abstract"]), clip(item["title"], target_chars), "text")
    if name == "LaMP-1":
        return Pair(f"Write the title of this paper: {clip(item['abstract'], max_chars)}", clip(item["title"], target_chars), "text")
    return Pair("Write a tweet:", clip(item["text"], target_chars), "text")  # LaMP-7


def query_pair(spec: TaskSpec, example: LampExample, max_chars: int, target_chars: int) -> Pair:
    """A train example as a query pair (its gold output; the input's free text cut to ``max_chars``)."""
    output = example.output or ""
    text = cut_input(spec, example.input, max_chars)
    if spec.kind == "generation":
        return Pair(text, clip(output, target_chars), "text")
    return Pair(text, output.strip(), "options")


def cut_input(spec: TaskSpec, text: str, max_chars: int) -> str:
    """Cut the free-text (query) part of an input to ``max_chars``, keeping the instruction before it."""
    text = str(text)
    query = query_text(spec.name, text)
    stripped = text.rstrip()
    if query and stripped.endswith(query) and len(query) > max_chars:
        return stripped[: len(stripped) - len(query)] + clip(query, max_chars)
    if len(text) > max_chars * 3:
        return clip(text, max_chars * 3)
    return text


class PromptBuilder:
    """Query prompts within ``max_tokens`` (counted with ``count_tokens``), with retrieved items."""

    def __init__(self, task: str, max_tokens: int, item_chars: int, count_tokens=None) -> None:
        self.spec = task_spec(task)
        self.max_tokens = max_tokens
        self.item_chars = item_chars
        self.count = count_tokens or (lambda text: len(text) // 4 + 1)

    def text(self, input_text: str, retrieved: list[dict] | None = None) -> str:
        """The prompt text before the LM's chat formatting.

        Retrieved items (best first) come first, each cut to ``item_chars`` characters; then the input.
        Over budget, items are dropped from the least relevant on, then the input's free text is cut.
        """
        return self.text_and_items(input_text, retrieved)[0]

    def text_and_items(self, input_text: str, retrieved: list[dict] | None = None) -> tuple[str, int]:
        """:meth:`text`, and how many of the retrieved items it kept within the budget."""
        items = [profile_text(self.spec.name, item, self.item_chars) for item in (retrieved or [])]
        while True:
            text = self._join(items, input_text)
            tokens = self.count(text)
            if tokens <= self.max_tokens:
                return text, len(items)
            if not items:
                break
            items = items[:-1]
        query = query_text(self.spec.name, input_text)
        if len(query) < 16:
            return text, 0  # nothing sensible left to cut: the instruction alone is over budget
        return self._fit_input(input_text, len(query), tokens), 0

    def _fit_input(self, body: str, query_chars: int, tokens: int) -> str:
        """``body`` with its free text cut (by :func:`cut_input`) to the longest length whose prompt fits
        the budget; cut to the 8-character minimum when none does (the instruction alone is over budget).

        The search starts from the cut that this input's own characters per token predict, gallops out
        from it to bracket the longest fitting cut, then bisects: a logarithmic number of token counts,
        exact whatever the text's characters per token (German, Japanese, digits, a small vocabulary).
        Token counts grow with the kept characters (up to the tokenization of the cut's last word).
        """
        lowest = 8
        fits: dict[int, tuple[bool, str]] = {}

        def fit(keep: int) -> bool:
            if keep not in fits:
                text = cut_input(self.spec, body, keep)
                fits[keep] = (self.count(text) <= self.max_tokens, text)
            return fits[keep][0]

        chars_per_token = len(body) / max(1, tokens)
        guess = min(query_chars - 1, max(lowest, int(query_chars - (tokens - self.max_tokens) * chars_per_token)))
        step = max(8, int(2 * chars_per_token))
        if fit(guess):  # gallop up: ``good`` fits, ``bad`` does not (the whole input does not)
            good, bad = guess, query_chars
            while good + step < bad and fit(good + step):
                good, step = good + step, step * 2
            bad = min(bad, good + step)
        else:  # gallop down to a cut that fits, or to the minimum
            good, bad = None, guess
            while good is None:
                keep = max(lowest, bad - step)
                if keep == bad:
                    return fits[bad][1]  # even the minimal cut is over budget: the input is exhausted
                if fit(keep):
                    good = keep
                else:
                    bad, step = keep, step * 2
        while bad - good > 1:
            middle = (good + bad) // 2
            if fit(middle):
                good = middle
            else:
                bad = middle
        return fits[good][1]

    @staticmethod
    def _join(items: list[str], body: str) -> str:
        if not items:
            return body
        return RETRIEVED_HEADER + "\n" + "\n".join(f"- {item}" for item in items) + "\n\n" + body

"""LaMP file I/O: tiny hand-written files of every task, error messages, property tests and a fuzz target.

Run the fuzz target standalone for longer: ``python tests/test_lamp_io.py --fuzz 20000 [--seed 1]``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmeta.data.lamp import (
    TASKS,
    LampExample,
    load_split,
    parse_questions,
    profile_text,
    query_text,
    read_outputs,
    read_questions,
    retrieval_text,
    task_spec,
    truncate_profile,
    write_predictions,
)
from pmeta.errors import InvalidConfig, InvalidData

# One question per task, as LaMP publishes them (inputs follow LaMP's own prompts).
SAMPLES: dict[str, dict] = {
    "LaMP-1": {
        "id": "100",
        "input": 'For an author who has written the paper with the title "Deep nets", which reference is related? '
        'Just answer with [1] or [2] without explanation. [1]: "Convolutional networks" [2]: "Medieval poetry"',
        "profile": [{"id": "1000", "title": "Conv nets for images", "abstract": "We train deep nets."},
                    {"id": "1001", "title": "Sparse coding", "abstract": "Dictionaries."}],
    },
    "LaMP-2": {
        "id": "200",
        "input": "Which tag does this movie relate to among the following tags? Just answer with the tag name without "
        "further explanation. tags: [sci-fi, comedy] description: A robot learns to love.",
        "profile": [{"id": "2000", "description": "Aliens invade.", "tag": "sci-fi"}],
    },
    "LaMP-3": {
        "id": "300",
        "input": "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
        "without further explanation. review: Loud and clear strings.",
        "profile": [{"id": "3001", "text": "Newer review", "score": "4", "date": "2014-02-28"},
                    {"id": "3000", "text": "Older review", "score": 2, "date": "2013-12-01"}],
    },
    "LaMP-4": {
        "id": "400",
        "input": "Generate a headline for the following article: Markets rallied on Friday.",
        "profile": [{"id": "4000", "title": "Stocks fall", "text": "Markets fell.", "date": "2017"}],
    },
    "LaMP-5": {
        "id": "500",
        "input": "Generate a title for the following abstract of a paper: We study meta-learning.",
        "profile": [{"id": "5000", "title": "Learning to learn", "abstract": "An old idea."}],
    },
    "LaMP-7": {
        "id": "700",
        "input": "Paraphrase the following tweet without any explanation before or after it: so tired today",
        "profile": [{"id": "7000", "text": "coffee first"}],
    },
}
GOLDS = {"LaMP-1": "[1]", "LaMP-2": "sci-fi", "LaMP-3": "5", "LaMP-4": "Markets rally", "LaMP-5": "Meta-learning", "LaMP-7": "so sleepy"}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_split(directory: Path, task: str, split: str = "dev", with_outputs: bool = True) -> None:
    write_json(directory / f"{split}_questions.json", [SAMPLES[task]])
    if with_outputs:
        write_json(directory / f"{split}_outputs.json", {"task": task.replace("-", "_"), "golds": [{"id": SAMPLES[task]["id"], "output": GOLDS[task]}]})


# ---------------------------------------------------------------------------------------- tasks and reading
@pytest.mark.parametrize("alias", ["LaMP-3", "LaMP_3", "lamp3", "lamp-3", "3", " LAMP_3 "])
def test_task_spec_aliases(alias):
    spec = task_spec(alias)
    assert (spec.name, spec.kind, spec.profile_fields, spec.official) == ("LaMP-3", "rating", ("text", "score"), "LaMP_3")
    assert spec.labels == ("1", "2", "3", "4", "5") and spec.metrics == ("mae", "rmse")


@pytest.mark.parametrize("bad", ["LaMP-6", "lamp8", "", "LaMP", "3.0", "x3", 3.5, None])
def test_task_spec_rejects_unknown_tasks(bad):
    with pytest.raises(InvalidConfig, match="Unknown LaMP task"):
        task_spec(bad)


def test_task_table():
    assert sorted(TASKS) == ["LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"]
    assert len(TASKS["LaMP-2"].labels) == 15 and TASKS["LaMP-1"].labels == ("[1]", "[2]")
    assert all(TASKS[t].labels is None and TASKS[t].metrics == ("rouge-1", "rouge-L") for t in ("LaMP-4", "LaMP-5", "LaMP-7"))


@pytest.mark.parametrize("task", list(SAMPLES))
def test_every_task_reads_with_outputs_joined(tmp_path, task):
    write_split(tmp_path, task)
    (example,) = load_split(tmp_path, task, "dev")
    assert (example.id, example.input, example.output) == (SAMPLES[task]["id"], SAMPLES[task]["input"], GOLDS[task])
    assert {item["id"] for item in example.profile} == {item["id"] for item in SAMPLES[task]["profile"]}
    for item in example.profile:
        assert all(isinstance(item[name], str) for name in task_spec(task).profile_fields)
        assert profile_text(task, item) and retrieval_text(task, item)


def test_questions_without_outputs_and_time_order(tmp_path):
    write_split(tmp_path, "LaMP-3", "test", with_outputs=False)
    (example,) = load_split(tmp_path, "LaMP-3", "test")
    assert example.output is None
    assert [item["id"] for item in example.profile] == ["3000", "3001"]  # sorted by date, oldest first
    assert example.profile[0]["score"] == "2"  # integer scores normalised to LaMP's strings


def test_undated_or_mixed_profiles_keep_file_order():
    profile = [{"id": "b", "text": "x", "date": "2014-01-02"}, {"id": "a", "text": "y"}]
    assert [p["id"] for p in parse_questions([{"id": "1", "input": "", "profile": profile}], "LaMP-7")[0].profile] == ["b", "a"]
    profile = [{"id": "b", "text": "x", "date": "2014-01-02"}, {"id": "a", "text": "y", "date": "yesterday"}]
    assert [p["id"] for p in parse_questions([{"id": "1", "input": "", "profile": profile}], "LaMP-7")[0].profile] == ["b", "a"]
    profile = [{"id": "b", "text": "x", "date": "2014-01-02T10:00:00"}, {"id": "a", "text": "y", "date": "2014-01-02T09:00:00"}]
    assert [p["id"] for p in parse_questions([{"id": "1", "input": "", "profile": profile}], "LaMP-7")[0].profile] == ["a", "b"]


def test_truncate_profile_keeps_most_recent():
    dated = [{"id": str(i), "date": f"2014-01-{30 - i:02d}"} for i in range(6)]  # newest first in the list
    assert [p["id"] for p in truncate_profile(dated, 3)] == ["2", "1", "0"]
    undated = [{"id": str(i)} for i in range(6)]
    assert [p["id"] for p in truncate_profile(undated, 2)] == ["4", "5"]
    assert truncate_profile(undated, 0) == [] and len(truncate_profile(undated, 10)) == 6


def test_texts_for_prompts_and_retrieval():
    review = {"id": "1", "text": "Great   strings,\nbright tone", "score": "5"}
    assert profile_text("LaMP-3", review) == "Great strings, bright tone (rating: 5)"
    clipped = profile_text("LaMP-3", {"id": "1", "text": "word " * 100, "score": "4"}, max_chars=40)
    assert len(clipped) <= 40 and clipped.endswith("(rating: 4)")
    assert retrieval_text("LaMP-3", review) == "Great   strings,\nbright tone"
    assert profile_text("LaMP-4", {"id": "1", "title": "T", "text": "body"}) == "body (title: T)"
    assert retrieval_text("LaMP-4", {"id": "1", "title": "T", "text": "body"}) == "T body"
    assert profile_text("LaMP-2", {"id": "1", "description": "d", "tag": "comedy"}) == "d (tag: comedy)"
    assert retrieval_text("LaMP-1", SAMPLES["LaMP-1"]["profile"][0]) == "Conv nets for images We train deep nets."


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("LaMP-1", "Convolutional networks Medieval poetry"),
        ("LaMP-2", "A robot learns to love."),
        ("LaMP-3", "Loud and clear strings."),
        ("LaMP-4", "Markets rallied on Friday."),
        ("LaMP-5", "We study meta-learning."),
        ("LaMP-7", "so tired today"),
    ],
)
def test_query_text_follows_lamp_extraction(task, expected):
    example = LampExample(SAMPLES[task]["id"], SAMPLES[task]["input"], [])
    assert query_text(task, example) == expected


def test_query_text_fallbacks():
    assert query_text("LaMP-4", "Generate a title for the following product review: nice amp") == "nice amp"
    assert query_text("LaMP-3", "no marker at all") == "no marker at all"


def test_predictions_round_trip(tmp_path):
    path = tmp_path / "out" / "preds.json"
    write_predictions(path, "lamp5", {"b": "Title two", "a": "Title one"})
    assert json.loads(path.read_text()) == {"task": "LaMP_5", "golds": [{"id": "b", "output": "Title two"}, {"id": "a", "output": "Title one"}]}
    assert read_outputs(path) == ("LaMP_5", {"b": "Title two", "a": "Title one"})
    assert [p.name for p in path.parent.iterdir()] == ["preds.json"]  # no temporary file left behind
    with pytest.raises(InvalidData, match="string"):
        write_predictions(path, "LaMP-5", {"a": 3})


# ---------------------------------------------------------------------------------------- errors
def _question(**changes) -> list:
    question = json.loads(json.dumps(SAMPLES["LaMP-3"]))
    question.update(changes)
    return [question]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": "1"}, r"questions file is a JSON list"),
        ([3], r"at \$\[0\]: a question must be a JSON object"),
        ([{"id": "1", "input": "x"}], r"at \$\[0\]: the question has no 'profile'"),
        (_question(id=None), r"at \$\[0\]\.id: the id must be a string"),
        (_question(id=" "), r"at \$\[0\]\.id: the id is empty"),
        (_question(input=5), r"at \$\[0\]\.input: expected a string"),
        (_question(profile={"id": "x"}), r"at \$\[0\]\.profile: expected a list"),
        (_question(profile=["x"]), r"at \$\[0\]\.profile\[0\]: a profile item must be a JSON object"),
        (_question(profile=[{"text": "t", "score": "5"}]), r"profile\[0\]: the profile item has no 'id'"),
        (_question(profile=[{"id": "1", "text": "t"}]), r"profile\[0\]: missing field 'score' \(LaMP-3 profile items need id, text, score\)"),
        (_question(profile=[{"id": "1", "text": "t", "score": "6"}]), r"profile\[0\]\.score: a LaMP-3 score must be one of 1, 2, 3, 4, 5"),
        (_question(profile=[{"id": "1", "text": "t", "score": "4.5"}]), r"profile\[0\]\.score"),
        (_question(profile=[{"id": "1", "text": ["t"], "score": "4"}]), r"profile\[0\]\.text: expected a string"),
        (_question(profile=[{"id": "1", "text": "t", "score": "4", "date": [2014]}]), r"profile\[0\]\.date: a date must be"),
        (_question() + _question(), r"at \$\[1\]: question id '300' already appears at \$\[0\]"),
    ],
)
def test_malformed_questions_name_file_and_position(tmp_path, data, message):
    path = write_json(tmp_path / "dev_questions.json", data)
    with pytest.raises(InvalidData, match=message) as caught:
        read_questions(path, "LaMP-3")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_wrong_task_fields_are_reported(tmp_path):
    path = write_json(tmp_path / "q.json", [SAMPLES["LaMP-3"]])
    with pytest.raises(InvalidData, match="missing field 'title' \\(LaMP-4 profile items need id, title, text\\)"):
        read_questions(path, "LaMP-4")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[{\"id\": ", "not valid JSON \\(line 1, column"),
        (b"\xff\xfe\x00[", "not UTF-8 text"),
        (b"", "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "JSON|deeply"),
        (b'[{"id": "q", "input": "x", "profile": [], "date": ' + b"9" * 5000 + b"}]", "not a LaMP JSON file: Exceeds the limit"),
        (b'[{"id": "q", "input": "x", "input": "y", "profile": []}]', "the key 'input' appears twice"),
        (b'[{"id": "q", "input": "x \\udfff", "profile": []}]', "lone UTF-16 surrogate"),
    ],
)
def test_unreadable_files(tmp_path, raw, message):
    path = tmp_path / "q.json"
    path.write_bytes(raw)
    with pytest.raises(InvalidData, match=message):
        read_questions(path, "LaMP-7")


def test_out_of_range_scores_and_lone_surrogates_in_parsed_data(tmp_path):
    item = {"id": "p", "text": "good", "score": 10**400}
    with pytest.raises(InvalidData, match="a LaMP-3 score must be one of 1, 2, 3, 4, 5"):
        parse_questions([{"id": "q", "input": "x", "profile": [item]}], "LaMP-3")
    with pytest.raises(InvalidData, match=r"\$\[0\]\.input: the string holds a lone UTF-16 surrogate"):
        parse_questions([{"id": "q", "input": "x\ud800", "profile": []}], "LaMP-3")
    with pytest.raises(InvalidData, match=r"profile\[0\]\.text: the string holds a lone UTF-16 surrogate"):
        parse_questions([{"id": "q", "input": "x", "profile": [{**item, "score": "5", "text": "\udc00"}]}], "LaMP-3")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "train_questions.json")
    with pytest.raises(InvalidData, match="LaMP path is not a regular file"):
        read_questions(tmp_path / "train_questions.json", "LaMP-3")


def test_missing_files_and_bad_split(tmp_path):
    with pytest.raises(InvalidData, match="has no dev_questions.json"):
        load_split(tmp_path, "LaMP-3", "dev")
    with pytest.raises(InvalidData, match="LaMP file not found"):
        read_questions(tmp_path / "absent.json", "LaMP-3")
    with pytest.raises(InvalidConfig, match="plain name"):
        load_split(tmp_path, "LaMP-3", "../dev")


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([], "JSON object"),
        ({"task": "LaMP_3"}, "JSON object"),
        ({"task": "LaMP_9", "golds": []}, r"at \$\.task: unknown LaMP task"),
        ({"task": "LaMP_3", "golds": {}}, r"at \$\.golds: expected a list"),
        ({"task": "LaMP_3", "golds": [{"id": "300"}]}, r"golds\[0\]: expected an object with 'id' and 'output'"),
        ({"task": "LaMP_3", "golds": [{"id": "300", "output": 5}]}, r"golds\[0\]\.output: expected a string"),
        ({"task": "LaMP_3", "golds": [{"id": "300", "output": "5"}, {"id": "300", "output": "4"}]}, "appears twice"),
        ({"task": "LaMP_4", "golds": [{"id": "300", "output": "5"}]}, "holds LaMP_4 outputs, but the task is LaMP-3"),
        ({"task": "LaMP_3", "golds": []}, "no output for question id '300'"),
        ({"task": "LaMP_3", "golds": [{"id": "300", "output": "5"}, {"id": "9", "output": "1"}]}, "output id '9' is not a question"),
    ],
)
def test_malformed_outputs(tmp_path, outputs, message):
    write_split(tmp_path, "LaMP-3", with_outputs=False)
    write_json(tmp_path / "dev_outputs.json", outputs)
    with pytest.raises(InvalidData, match=message) as caught:
        load_split(tmp_path, "LaMP-3", "dev")
    assert "dev_outputs.json" in str(caught.value)


# ---------------------------------------------------------------------------------------- property tests
_text = st.text(max_size=30)
_ids = st.one_of(st.text(min_size=1, max_size=8).filter(str.strip), st.integers(0, 10**6))


@st.composite
def lamp_files(draw):
    """A valid questions list of a random task, with its outputs."""
    task = draw(st.sampled_from(sorted(SAMPLES)))
    spec = task_spec(task)
    n = draw(st.integers(0, 4))
    questions, ids = [], draw(st.lists(st.text(min_size=1, max_size=6).filter(str.strip), min_size=n, max_size=n, unique=True))
    for question_id in ids:
        profile = []
        for j in range(draw(st.integers(0, 4))):
            item = {"id": draw(_ids)}
            for name in spec.profile_fields:
                item[name] = draw(st.sampled_from(["1", "2", "3", "4", "5", 3])) if name == "score" else draw(_text)
            if draw(st.booleans()):
                item["date"] = draw(st.one_of(st.integers(1990, 2030), st.dates().map(str), _text))
            profile.append(item)
        questions.append({"id": question_id, "input": draw(_text), "profile": profile})
    golds = [{"id": q["id"], "output": draw(_text)} for q in questions]
    return task, questions, {"task": spec.official, "golds": golds}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lamp_files())
def test_valid_files_round_trip(tmp_path, files):
    task, questions, outputs = files
    write_json(tmp_path / "train_questions.json", questions)
    write_json(tmp_path / "train_outputs.json", outputs)
    examples = load_split(tmp_path, task, "train")
    assert [e.id for e in examples] == [q["id"] for q in questions]
    assert [e.input for e in examples] == [q["input"] for q in questions]
    assert [e.output for e in examples] == [g["output"] for g in outputs["golds"]]
    for example, question in zip(examples, questions):
        assert sorted(str(p["id"]) for p in example.profile) == sorted(str(p["id"]) for p in question["profile"])
        k = len(example.profile) // 2
        assert truncate_profile(example.profile, k) == (example.profile[-k:] if k else [])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["id", "input", "profile", "text", "score", "title", "date", "task", "golds", "output", "x"]), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(_json, st.sampled_from(sorted(SAMPLES)))
def test_arbitrary_json_gives_examples_or_invalid_data(data, task):
    check_outcome(lambda: parse_questions(data, task))


# ---------------------------------------------------------------------------------------- fuzz target
def check_outcome(call) -> None:
    """The reader's contract: valid examples (or outputs), or InvalidData; nothing else."""
    try:
        result = call()
    except InvalidData as error:
        assert str(error).strip() and "\n" not in str(error).strip()
        return
    if isinstance(result, tuple):  # read_outputs
        assert task_spec(result[0]) and all(isinstance(k, str) and isinstance(v, str) for k, v in result[1].items())
        return
    for example in result:
        assert isinstance(example.id, str) and isinstance(example.input, str)
        assert all(isinstance(item, dict) and isinstance(item["id"], str) for item in example.profile)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.randrange(5)
        position = rng.randrange(len(data) + 1)
        if choice == 0 and data:  # flip a byte
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:  # insert JSON punctuation or a random byte
            data[position:position] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"1e999", b"-", bytes([rng.randrange(256)])])
        elif choice == 2 and data:  # delete a span
            del data[position : position + rng.randint(1, 8)]
        elif choice == 3:  # truncate
            del data[position:]
        else:  # duplicate a span
            data[position:position] = data[position : position + rng.randint(1, 32)]
    return bytes(data)


def fuzz_lamp_reader(directory: Path, iterations: int, seed: int = 0) -> int:
    """Mutate valid LaMP files of every task and read them back; returns how many inputs were read as valid."""
    rng = random.Random(seed)
    corpus = []
    for task, sample in SAMPLES.items():
        corpus.append((task, "questions", json.dumps([sample, dict(sample, id="x")]).encode()))
        corpus.append((task, "outputs", json.dumps({"task": task.replace("-", "_"), "golds": [{"id": sample["id"], "output": GOLDS[task]}]}).encode()))
    valid = 0
    path = directory / "fuzz.json"
    for _ in range(iterations):
        task, kind, original = rng.choice(corpus)
        raw = _mutate(original, rng)
        path.write_bytes(raw)
        try:
            if kind == "questions":
                check_outcome(lambda: read_questions(path, task))
            else:
                check_outcome(lambda: read_outputs(path))
        except Exception:  # anything but InvalidData is a bug: keep the input
            keep = directory / f"crash-{task}-{kind}-{rng.randrange(10**9)}.json"
            keep.write_bytes(raw)
            raise AssertionError(f"reader crashed on {keep}") from None
        try:
            (read_questions if kind == "questions" else lambda p, t: read_outputs(p))(path, task)
            valid += 1
        except InvalidData:
            pass
    return valid


def test_fuzz_lamp_reader_briefly(tmp_path):
    valid = fuzz_lamp_reader(tmp_path, iterations=400, seed=0)
    assert 0 < valid < 400  # the mutations hit both outcomes


if __name__ == "__main__":  # python tests/test_lamp_io.py --fuzz 20000 [--seed 1]
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Fuzz pmeta's LaMP reader with mutated files.")
    parser.add_argument("--fuzz", type=int, default=10000, help="iterations")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        count = fuzz_lamp_reader(Path(folder), options.fuzz, options.seed)
    print(f"fuzzed {options.fuzz} inputs: {count} read as valid, the rest rejected with InvalidData, no crash")
    sys.exit(0)

"""history.json: valid histories, every bad case as a one-line InvalidHistory naming its JSON path,
the resolution rules, and property tests that arbitrary JSON and bytes never raise anything else."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmeta.data import Catalog, HistoryItem, ResolvedHistory, UserHistory, load_history, parse_history, resolve_history
from pmeta.data.history import MAX_BYTES, MAX_ITEMS
from pmeta.errors import InvalidHistory

EXAMPLE = {
    "user_id": "u123",
    "items": [
        {"item_id": "2571", "rating": 5, "timestamp": 978300760},
        {"text": "a film not in the catalogue, by its title", "rating": 4},
    ],
}
CATALOG = Catalog(
    ["1", "2", "3", "4"],
    ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Heat (1995)"],
    [["Animation"], ["Adventure"], ["Crime"], ["Drama"]],
)


def history(*items: dict, user_id: str = "u") -> UserHistory:
    return parse_history({"user_id": user_id, "items": list(items)})


# ---------------------------------------------------------------------------------------- valid
def test_the_documented_example():
    parsed = parse_history(EXAMPLE)
    assert parsed.user_id == "u123"
    assert parsed.items[0] == HistoryItem(item_id="2571", rating=5.0, timestamp=978300760)
    assert parsed.items[1].text == "a film not in the catalogue, by its title" and parsed.items[1].item_id is None
    assert isinstance(parsed.items[0].rating, float)


def test_json_integer_ids_become_strings_and_texts_are_stripped():
    parsed = history({"item_id": 2571}, {"item_id": " 7 ", "text": "  Heat  ", "rating": 0, "timestamp": 0})
    assert [item.item_id for item in parsed.items] == ["2571", "7"]
    assert parsed.items[1].text == "Heat" and parsed.items[1].rating == 0.0 and parsed.items[1].timestamp == 0


def test_empty_and_missing_items_are_valid():
    assert parse_history({"user_id": "u", "items": []}).items == []
    assert parse_history({"user_id": "u"}).items == []


def test_explicit_nulls_mean_absent():
    parsed = history({"item_id": "1", "text": None, "rating": None, "timestamp": None})
    assert parsed.items[0] == HistoryItem(item_id="1")


def test_limits_at_their_edges_are_valid():
    parsed = parse_history(
        {"user_id": "x" * 128, "items": [{"text": "t" * 2000, "rating": 5.0}, {"item_id": "y" * 128, "rating": 0.5}]}
    )
    assert len(parsed.items) == 2
    assert len(history(*[{"item_id": str(i)} for i in range(10)]).items) == 10


# ---------------------------------------------------------------------------------------- invalid
@pytest.mark.parametrize(
    "obj, match",
    [
        ([], r"^history: a history must be a JSON object"),
        ("u1", r"must be a JSON object .* not a string"),
        ({"items": []}, r"^history: user_id: this required field is missing\.$"),
        ({"user_id": 5, "items": []}, r"user_id: must be a string, not an integer 5"),
        ({"user_id": "", "items": []}, r"user_id: must be 1 to 128 characters"),
        ({"user_id": "x" * 129, "items": []}, r"user_id: must be 1 to 128 characters, not 129"),
        ({"user_id": "a/b", "items": []}, r"user_id: must not be a path"),
        ({"user_id": "a\\b", "items": []}, r"user_id: must not be a path"),
        ({"user_id": ".", "items": []}, r"user_id: must not be a path"),
        ({"user_id": "..", "items": []}, r"user_id: must not be a path"),
        ({"user_id": "a\x00b", "items": []}, r"user_id: must not contain control characters"),
        ({"user_id": "a\nb", "items": []}, r"user_id: must not contain control characters"),
        ({"user_id": "a\x85b", "items": []}, r"user_id: must not contain control characters"),
        ({"user_id": "u", "items": {}}, r"^history: items: must be an array\.$"),
        ({"user_id": "u", "items": [], "name": "x"}, r"^history: name: unknown field \(allowed: user_id and items\)"),
        ({"user_id": "u", "items": [5]}, r"^history: items\[0\]: must be an object\.$"),
        ({"user_id": "u", "items": [{}]}, r"items\[0\]: an item needs an item_id or a text"),
        ({"user_id": "u", "items": [{"rating": 4}]}, r"items\[0\]: an item needs an item_id or a text"),
        ({"user_id": "u", "items": [{"item_id": True}]}, r"items\[0\]\.item_id: must be a string or an integer, not a boolean"),
        ({"user_id": "u", "items": [{"item_id": 1.0}]}, r"items\[0\]\.item_id: must be a string or an integer, not a number"),
        ({"user_id": "u", "items": [{"item_id": ["1"]}]}, r"items\[0\]\.item_id: must be a string or an integer, not an array"),
        ({"user_id": "u", "items": [{"item_id": ""}]}, r"items\[0\]\.item_id: must be 1 to 128 characters"),
        ({"user_id": "u", "items": [{"text": "   "}]}, r"items\[0\]\.text: must be 1 to 2000 characters"),
        ({"user_id": "u", "items": [{"text": "x" * 2001}]}, r"items\[0\]\.text: must be 1 to 2000 characters"),
        ({"user_id": "u", "items": [{"text": 12}]}, r"items\[0\]\.text: must be a string, not an integer"),
        ({"user_id": "u", "items": [{"item_id": "1"}, {"item_id": "2", "rating": "5"}]}, r"items\[1\]\.rating: must be a number"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": True}]}, r"items\[0\]\.rating: must be a number .* not a boolean"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": 5.5}]}, r"items\[0\]\.rating: must be a finite number from 0 to 5"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": -0.5}]}, r"items\[0\]\.rating: must be a finite number"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": math.inf}]}, r"items\[0\]\.rating: must be a finite number"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": math.nan}]}, r"items\[0\]\.rating: must be a finite number"),
        ({"user_id": "u", "items": [{"item_id": "1", "rating": 10**400}]}, r"items\[0\]\.rating: must be a finite number"),
        ({"user_id": "u", "items": [{"item_id": "1", "timestamp": -1}]}, r"items\[0\]\.timestamp: must be from 0"),
        ({"user_id": "u", "items": [{"item_id": "1", "timestamp": 2**63}]}, r"items\[0\]\.timestamp: must be from 0"),
        ({"user_id": "u", "items": [{"item_id": "1", "timestamp": 1.5}]}, r"items\[0\]\.timestamp: must be a whole number"),
        ({"user_id": "u", "items": [{"item_id": "1", "timestamp": False}]}, r"items\[0\]\.timestamp: must be a whole number"),
        ({"user_id": "u", "items": [{"item_id": "1", "colour": "red"}]}, r"items\[0\]\.colour: unknown field"),
        ({"user_id": "u", "items": [{"item_id": "1"}, {"item_id": "2"}, {"item_id": 1}]}, r"items: item_id '1' appears twice, at items\[0\] and items\[2\]"),
        ({"user_id": 1, "items": [{"item_id": True}]}, r"user_id: .* \(and 1 more problem\)"),
    ],
)
def test_bad_histories_raise_one_line_naming_the_json_path(obj, match):
    with pytest.raises(InvalidHistory, match=match) as info:
        parse_history(obj)
    assert "\n" not in str(info.value)


def test_the_item_limit_is_enforced_and_overridable():
    items = [{"item_id": str(i)} for i in range(11)]
    with pytest.raises(InvalidHistory, match=r"items: 11 items is more than the limit of 10"):
        parse_history({"user_id": "u", "items": items}, max_items=10)
    assert len(parse_history({"user_id": "u", "items": items}, max_items=11).items) == 11
    assert MAX_ITEMS == 10_000 and MAX_BYTES == 10 * 1024 * 1024
    with pytest.raises(InvalidHistory, match="limit of 10000"):
        parse_history({"user_id": "u", "items": [{"text": "t"}] * (MAX_ITEMS + 1)})
    # any other iterable is read one past the limit at most: a generator is limited too, a huge range refused at once
    with pytest.raises(InvalidHistory, match="items: more than the limit of 10 items"):
        parse_history({"user_id": "u", "items": iter(items)}, max_items=10)
    with pytest.raises(InvalidHistory, match="more than the limit of 10000"):
        parse_history({"user_id": "u", "items": range(10**12)})
    assert len(parse_history({"user_id": "u", "items": (item for item in items)}).items) == 11


# ---------------------------------------------------------------------------------------- files
def test_load_history_reads_a_valid_file(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps(EXAMPLE), encoding="utf-8")
    assert load_history(path) == parse_history(EXAMPLE)
    assert load_history(str(path)).user_id == "u123"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXAMPLE).encode())  # a UTF-8 byte-order mark is fine
    assert load_history(path).user_id == "u123"


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"h\.json: the file is empty"),
        (b"  \n", r"h\.json: the file is empty"),
        (b'{"user_id": "u", "items": [', r"h\.json: invalid JSON at line 1 column 28"),
        (b'{"user_id": "u",\n "items": [}', r"h\.json: invalid JSON at line 2 column 12"),
        (b"\xff\xfe{\x00}\x00", r"h\.json: not UTF-8 text \(invalid byte at offset 0\)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"h\.json: not UTF-8 text"),
        (b"[" * 100_000, r"h\.json: .*(nested too deeply|invalid JSON)"),
        (b'{"user_id": "u", "items": [{"item_id": ' + b"9" * 5000 + b"}]}", r"h\.json: invalid JSON: Exceeds the limit .*digits\.$"),
        (b'{"user_id": "u", "items": [{"item_id": "1", "rating": NaN}]}', r"h\.json: items\[0\]\.rating: must be a finite"),
        (b'{"user_id": "u", "items": [{"item_id": "1", "rating": 1e999}]}', r"h\.json: items\[0\]\.rating: must be a finite"),
        (b'{"user_id": "u", "items": [{"item_id": "1"}, {"item_id": "1"}]}', r"h\.json: items: item_id '1' appears twice"),
        (b'"just a string"', r"h\.json: a history must be a JSON object"),
        (b'{"user_id": "u", "items": [], "user_id": "v"}', r"h\.json: invalid JSON: the key 'user_id' appears twice in one object\.$"),
        (b'{"user_id": "u", "items": [{"item_id": "1", "rating": 5, "rating": 1}]}', r"h\.json: invalid JSON: the key 'rating' appears twice"),
        (b'{"user_id": "u\\ud800", "items": []}', r"h\.json: invalid JSON: the string 'u\\ud800' holds a lone UTF-16 surrogate"),
        (b'{"user_id": "u", "items": [{"text": "film \\udfff x"}]}', r"h\.json: invalid JSON: .*lone UTF-16 surrogate"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "h.json"
    path.write_bytes(content)
    with pytest.raises(InvalidHistory, match=match) as info:
        load_history(path)
    assert "\n" not in str(info.value)


def test_missing_odd_and_oversized_files(tmp_path):
    with pytest.raises(InvalidHistory, match=r"^History file not found: .*nope\.json\.$"):
        load_history(tmp_path / "nope.json")
    with pytest.raises(InvalidHistory, match=r"^History path is not a regular file"):
        load_history(tmp_path)
    with pytest.raises(InvalidHistory, match=r"^History file contains a NUL byte: 'bad\\x00name\.json'$"):
        load_history("bad\0name.json")
    path = tmp_path / "h.json"
    path.write_text(json.dumps(EXAMPLE) + " " * 200)
    with pytest.raises(InvalidHistory, match=r"bytes is more than the limit of 100 bytes"):
        load_history(path, max_bytes=100)
    path.write_text(json.dumps({"user_id": "u", "items": [{"item_id": str(i)} for i in range(3)]}))
    with pytest.raises(InvalidHistory, match="more than the limit of 2"):
        load_history(path, max_items=2)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "h.json"
    os.mkfifo(fifo)
    with pytest.raises(InvalidHistory, match=r"^History path is not a regular file"):
        load_history(fifo)


def test_valid_surrogate_pairs_pass_and_lone_ones_in_python_objects_are_refused():
    assert history({"text": "caf\u00e9 \U0001F3AC"}).items[0].text == "caf\u00e9 \U0001F3AC"  # a pair in JSON, one char here
    with pytest.raises(InvalidHistory, match=r"items\[0\]\.text: must be valid Unicode text"):
        history({"text": "film \udfff"})
    with pytest.raises(InvalidHistory, match=r"items\[0\]\.item_id: must be valid Unicode text"):
        history({"item_id": "\ud800"})
    with pytest.raises(InvalidHistory, match=r"user_id: must be valid Unicode text"):
        history({"item_id": "1"}, user_id="u\ud800")


# ---------------------------------------------------------------------------------------- resolution
def test_resolution_rules_and_time_order():
    resolved = resolve_history(
        history(
            {"item_id": "3", "timestamp": 30, "rating": 5},
            {"text": "A new film", "rating": 2},  # free text, no timestamp
            {"item_id": "1", "timestamp": 10},
            {"text": "  jumanji (1995) "},  # exact title, any case -> catalogue item
            {"item_id": "99", "text": "Another film", "timestamp": 20},  # unknown id with text -> free text
        ),
        CATALOG,
    )
    assert isinstance(resolved, ResolvedHistory) and resolved.user_id == "u"
    assert resolved.entries == [
        (0, None, None, 10),
        (None, "Another film", None, 20),
        (2, None, 5.0, 30),
        (None, "A new film", 2.0, None),
        (1, None, None, None),
    ]
    assert resolved.item_indexes == [0, 2, 1]
    assert resolved.texts == ["Another film", "A new film"]
    assert resolved.ratings == [None, 5.0, None, None, 2.0]  # item_indexes, then texts


def test_equal_timestamps_keep_file_order_and_titles_map_to_their_first_item():
    resolved = resolve_history(history({"item_id": "2", "timestamp": 5}, {"text": "HEAT (1995)", "timestamp": 5}), CATALOG)
    assert resolved.item_indexes == [1, 2]  # "Heat (1995)" is items 2 and 3: the first wins


def test_unknown_id_whose_text_is_a_title_maps_to_the_title_and_repeats_are_dropped():
    resolved = resolve_history(history({"item_id": "1"}, {"item_id": "old-42", "text": "Toy Story (1995)"}), CATALOG)
    assert resolved.item_indexes == [0] and resolved.texts == [] and len(resolved.entries) == 1


def test_an_item_given_by_id_and_by_title_counts_once_with_its_latest_rating_in_any_file_order():
    """The first in the file won, whatever the timestamps: a disliked old rating and a liked new one
    gave opposite users depending on JSON order."""
    old, new = {"item_id": "1", "rating": 1, "timestamp": 100}, {"text": "Toy Story (1995)", "rating": 5, "timestamp": 200}
    for items in ((old, new), (new, old)):
        resolved = resolve_history(history(*items), CATALOG)
        assert resolved.entries == [(0, None, 5.0, 200)], items
    undated = resolve_history(history({"item_id": "1", "rating": 2}, {"text": "Toy Story (1995)", "rating": 5}), CATALOG)
    assert undated.entries == [(0, None, 2.0, None)]  # neither is later: the first in the file


def test_unknown_ids_without_text():
    unknown = [{"item_id": f"x{i}"} for i in range(7)]
    with pytest.raises(InvalidHistory, match=r"^7 item ids are not in the catalogue and without text: 'x0', 'x1', 'x2', 'x3', 'x4' and 2 more"):
        resolve_history(history({"item_id": "1"}, *unknown), CATALOG)
    with pytest.raises(InvalidHistory, match=r"^1 item id is not in the catalogue .*'77'"):
        resolve_history(history({"item_id": "77"}), CATALOG)
    resolved = resolve_history(history({"item_id": "77"}, {"item_id": "2", "rating": 4}), CATALOG, ignore_unknown=True)
    assert resolved.item_indexes == [1] and resolved.ratings == [4.0]


def test_an_empty_history_resolves_to_nothing():
    resolved = resolve_history(history(), CATALOG)
    assert (resolved.item_indexes, resolved.texts, resolved.ratings, resolved.entries) == ([], [], [], [])


# ---------------------------------------------------------------------------------------- properties
KEYS = ["user_id", "items", "item_id", "text", "rating", "timestamp", "extra"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=25,
)
item_like = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.floats(), st.none()),
        "text": st.one_of(st.text(max_size=5), st.integers(), st.none()),
        "rating": st.one_of(st.floats(), st.integers(-2, 7), st.booleans(), st.text(max_size=2), st.none()),
        "timestamp": st.one_of(st.integers(), st.floats(), st.booleans(), st.none()),
    },
)
history_like = st.fixed_dictionaries(
    {"user_id": st.one_of(st.text(max_size=6), st.integers(), st.sampled_from([".", "..", "a/b", "é"]))},
    optional={"items": st.lists(item_like, max_size=5)},
)


def parses_or_rejects(value) -> None:
    try:
        assert isinstance(parse_history(value), UserHistory)
    except InvalidHistory as error:
        assert "\n" not in str(error) and str(error)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_arbitrary_json_values_give_a_history_or_invalid_history(value):
    parses_or_rejects(value)


@given(history_like)
@settings(max_examples=300, deadline=None)
def test_history_shaped_values_give_a_history_or_invalid_history(value):
    parses_or_rejects(value)


@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_in_a_file_give_a_history_or_invalid_history(data):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "h.json"
        path.write_bytes(data)
        try:
            assert isinstance(load_history(path), UserHistory)
        except InvalidHistory as error:
            assert "\n" not in str(error)

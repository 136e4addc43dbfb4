"""Amazon review JSON lines -> LaMP-format tasks: synthetic files written here, plus one run on the real data."""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pmeta.cli import app
from pmeta.data.lamp import load_split, query_text, read_outputs
from pmeta.data.reviews import read_reviews, reviews_to_lamp
from pmeta.errors import InvalidConfig, InvalidData

REAL_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-musical-instruments" / "Musical_Instruments.zip"
DAY = 86400


def review(user: str, n: int, stars: float = 5.0, **changes) -> dict:
    record = {
        "reviewerID": user, "asin": f"B{n:04d}", "reviewerName": "someone", "helpful": [0, 0],
        "reviewText": f"review {n} by {user}: the strings sound {'bright' if n % 2 else 'warm'}",
        "overall": stars, "summary": f"{user} summary {n}", "unixReviewTime": 1_300_000_000 + n * DAY, "reviewTime": "x",
    }  # fmt: skip
    record.update(changes)
    return record


def synthetic(path: Path, users: int = 12, per_user=lambda u: 3 + u) -> Path:
    """``users`` users, user u with ``per_user(u)`` reviews written newest first (the converter must sort)."""
    lines = []
    for u in range(users):
        for n in reversed(range(per_user(u))):
            lines.append(json.dumps(review(f"U{u:02d}", n, stars=float(1 + (u + n) % 5))))
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def test_rating_task_splits_users_and_orders_profiles(tmp_path):
    source = synthetic(tmp_path / "reviews.json")
    counts = reviews_to_lamp(source, "rating", tmp_path / "out", seed=0, test_fraction=0.25, dev_fraction=0.25, k_max=5)
    splits = {name: load_split(tmp_path / "out", "LaMP-3", name) for name in ("train", "dev", "test")}
    users = {name: {e.id for e in examples} for name, examples in splits.items()}
    assert set.union(*users.values()) == {f"U{u:02d}" for u in range(12)}
    assert sum(len(u) for u in users.values()) == 12  # disjoint
    assert (len(users["test"]), len(users["dev"])) == (3, 3)
    assert counts["splits"]["test"]["users"] == 3 and counts["users"] == 12 and counts["reviews_read"] == sum(3 + u for u in range(12))
    for name, examples in splits.items():
        for example in examples:
            u = int(example.id[1:])
            total = 3 + u
            assert example.output == str(1 + (u + total - 1) % 5)  # the last review's stars
            assert query_text("LaMP-3", example).startswith(f"review {total - 1} by {example.id}")
            numbers = [int(item["id"].split("-")[1]) for item in example.profile]
            assert numbers == sorted(numbers) and numbers[-1] == total - 2  # time order, ending just before the example
            if name == "train":
                assert len(example.profile) == total - 1
            else:
                assert total >= 6 and len(example.profile) == 5  # cold-start users: exactly k_max items
            assert all(item["score"] == str(1 + (u + n) % 5) for item, n in zip(example.profile, numbers))
            assert all(item["date"] and item["asin"] for item in example.profile)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["settings"]["seed"] == 0 and meta["source"]["file"] == "reviews.json" and "redistribut" in meta["licence"]
    assert (tmp_path / "out" / "README.md").is_file()


def test_title_task_reads_as_lamp4_and_split_is_seeded(tmp_path):
    source = synthetic(tmp_path / "reviews.json")
    reviews_to_lamp(source, "title", tmp_path / "a", seed=3, max_text_chars=30)
    reviews_to_lamp(source, "title", tmp_path / "b", seed=3, max_text_chars=30)
    reviews_to_lamp(source, "title", tmp_path / "c", seed=4, max_text_chars=30)
    assert (tmp_path / "a" / "test_questions.json").read_bytes() == (tmp_path / "b" / "test_questions.json").read_bytes()
    tests = [{e.id for e in load_split(tmp_path / d, "LaMP-4", "test")} for d in ("a", "c")]
    assert tests[0] != tests[1]
    example = load_split(tmp_path / "a", "LaMP-4", "train")[0]
    assert example.output == f"{example.id} summary {int(example.id[1:]) + 2}"
    assert all(item["title"].startswith(example.id) and len(item["text"]) <= 30 for item in example.profile)
    assert read_outputs(tmp_path / "a" / "dev_outputs.json")[0] == "LaMP_4"


def test_unusable_reviews_and_small_users_are_left_out(tmp_path):
    lines = [review("A", n) for n in range(4)] + [review("A", 9, reviewText="  ")] + [review("B", 0)] + [review("C", n, summary="") for n in range(3)]
    source = tmp_path / "r.json"
    source.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    counts = reviews_to_lamp(source, "title", tmp_path / "out", test_fraction=0, dev_fraction=0)
    assert counts["reviews_unusable"] == 4 and counts["users"] == 1  # B has one review, C no summaries
    counts = reviews_to_lamp(source, "rating", tmp_path / "out2", test_fraction=0, dev_fraction=0)
    assert counts["users"] == 2 and counts["reviews_unusable"] == 1


def test_max_users_and_train_profile_cap(tmp_path):
    source = synthetic(tmp_path / "reviews.json", users=6, per_user=lambda u: 30)
    counts = reviews_to_lamp(source, "rating", tmp_path / "out", max_users=4, max_profile=10, test_fraction=0.25, dev_fraction=0)
    assert counts["users"] == 4 and counts["splits"]["train"]["max_profile"] == 10 and counts["splits"]["test"]["avg_profile"] == 5


@pytest.mark.parametrize("container", ["gz", "zip"])
def test_compressed_inputs(tmp_path, container):
    plain = synthetic(tmp_path / "reviews.json", users=4)
    if container == "gz":
        source = tmp_path / "reviews.json.gz"
        source.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        source = tmp_path / "reviews.zip"
        with zipfile.ZipFile(source, "w") as archive:
            archive.write(plain, "Musical_Instruments.json")
    assert reviews_to_lamp(source, "rating", tmp_path / "out")["reviews_read"] == 3 + 4 + 5 + 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"reviewerID": "A"\n', "line 1: not a JSON object"),
        (b"[1, 2]\n", "line 1: expected a JSON object per line, found list"),
        (json.dumps({k: v for k, v in review("A", 1).items() if k != "summary"}).encode(), "line 1: missing field 'summary'"),
        (json.dumps(review("A", 1, overall=7.0)).encode(), "'overall' must be a star rating 1-5"),
        (json.dumps(review("A", 1, overall=4.5)).encode(), "'overall' must be a star rating"),
        (json.dumps(review("A", 1, unixReviewTime="2014")).encode(), "'unixReviewTime' must be a non-negative integer"),
        (json.dumps(review("A", 1, reviewerID="")).encode(), "'reviewerID' must be a non-empty string"),
        (json.dumps(review("A", 1, reviewText=None)).encode(), "'reviewText' must be a string"),
        (b"\n" + json.dumps(review("A", 1)).encode() + b"\nnot json\n", "line 3: not a JSON object"),
        (b"\xff\xfe\x00\x01garbage", "line 1: binary data|not UTF-8"),
        (b"\n\n", "holds no reviews"),
        (b"PK\x03\x04 broken", "not a readable zip file"),
        (b"\x1f\x8b\x08\x00broken", "cannot read the compressed data"),
        (json.dumps(review("A", 1)).encode() + b"\n" + json.dumps(review("B", 1)).encode(), "no user has 2 or more usable reviews"),
        (json.dumps(review("A", 1, reviewText="bad \ud83d half emoji")).encode(), "line 1: the string 'bad .*' holds a lone UTF-16 surrogate"),
        (b'{"reviewerID": "A", "reviewerID": "B"}\n', "line 1: the key 'reviewerID' appears twice"),
    ],
)
def test_malformed_input_raises_invalid_data_and_writes_nothing(tmp_path, content, message):
    source = tmp_path / "bad.json"
    source.write_bytes(content)
    with pytest.raises(InvalidData, match=message) as caught:
        reviews_to_lamp(source, "rating", tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # no output and no staging folder


def test_zip_must_hold_one_json_file(tmp_path):
    source = tmp_path / "two.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("a.json", "{}")
        archive.writestr("b.json", "{}")
    with pytest.raises(InvalidData, match="exactly one .json review file"):
        reviews_to_lamp(source, "rating", tmp_path / "out")


def test_an_encrypted_zip_is_invalid_data(tmp_path):
    plain = synthetic(tmp_path / "reviews.json", users=4)
    source = tmp_path / "locked.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.write(plain, "Musical_Instruments.json")
    data = bytearray(source.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        data[data.index(signature) + offset] |= 0x1  # the "encrypted" flag: zipfile then asks for a password
    source.write_bytes(bytes(data))
    with pytest.raises(InvalidData, match="cannot be read: it is encrypted"):
        reviews_to_lamp(source, "rating", tmp_path / "out")


def test_reading_closes_every_file(tmp_path):
    plain = synthetic(tmp_path / "reviews.json", users=4)
    sources = [tmp_path / "r.zip", tmp_path / "r.json.gz", plain]
    with zipfile.ZipFile(sources[0], "w") as archive:
        archive.write(plain, "Musical_Instruments.json")
    sources[1].write_bytes(gzip.compress(plain.read_bytes()))
    open_files = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = open_files()
    for source in sources:
        read_reviews(source)
    assert open_files() == before


def test_a_users_repeated_review_of_a_product_counts_once(tmp_path):
    lines = []
    for u in range(10):
        records = [review(f"U{u}", n, stars=5.0) for n in range(6)]
        records.append(review(f"U{u}", 5, stars=1.0, unixReviewTime=1_300_000_000 + 9 * DAY))  # the last one, again
        lines += [json.dumps(r) for r in records]
    source = tmp_path / "dup.json"
    source.write_text("\n".join(lines))
    counts = reviews_to_lamp(source, "rating", tmp_path / "out", test_fraction=0.5, dev_fraction=0.0)
    assert counts["reviews_repeated"] == 10
    for split in ("train", "test"):
        for example in load_split(tmp_path / "out", "LaMP-3", split):
            assert example.output == "5"  # the earliest review of B0005 is the question
            assert query_text("LaMP-3", example).startswith(f"review 5 by {example.id}")
            assert all(item["asin"] != "B0005" for item in example.profile)  # never its own product


def test_output_directory_rules(tmp_path):
    source = synthetic(tmp_path / "reviews.json", users=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InvalidData, match="not empty and is not an earlier reviews-to-lamp output"):
        reviews_to_lamp(source, "rating", foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    reviews_to_lamp(source, "rating", tmp_path / "out")
    reviews_to_lamp(source, "title", tmp_path / "out")  # an earlier output is replaced whole
    assert read_outputs(tmp_path / "out" / "train_outputs.json")[0] == "LaMP_4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out", "reviews.json"]
    (tmp_path / "out" / "bank").mkdir()  # anything else in an earlier output: the folder is no longer replaced
    (tmp_path / "out" / "bank" / "bank.db").write_text("important")
    with pytest.raises(InvalidData, match="or holds other files too"):
        reviews_to_lamp(source, "rating", tmp_path / "out")
    assert (tmp_path / "out" / "bank" / "bank.db").read_text() == "important"
    with pytest.raises(InvalidConfig, match="rating or title"):
        reviews_to_lamp(source, "stars", tmp_path / "x")
    with pytest.raises(InvalidConfig):
        reviews_to_lamp(source, "rating", tmp_path / "x", test_fraction=0.7, dev_fraction=0.5)
    with pytest.raises(InvalidData, match="not found"):
        reviews_to_lamp(tmp_path / "absent.json", "rating", tmp_path / "x")


def test_settings_of_the_wrong_type_are_config_errors_and_numpy_numbers_are_python_ones(tmp_path):
    """Library callers: settings are checked before any work (a float max_users used to fail inside a
    slice, numpy ints only in meta.json's json.dumps after the whole conversion); an out_dir that is a
    loop of symbolic links is InvalidData, not a RuntimeError from Path.resolve."""
    import numpy as np

    source = synthetic(tmp_path / "reviews.json")
    for settings_, message in (({"max_users": 2.5}, "max_users must be a whole number >= 1, got 2.5"), ({"k_max": "3"}, "k_max must be a whole number"),
                               ({"seed": True}, "seed must be a whole number"), ({"test_fraction": "0.1"}, "must be numbers in"),
                               ({"max_text_chars": 5}, "max_text_chars must be a whole number >= 20")):  # fmt: skip
        with pytest.raises(InvalidConfig, match=message):
            reviews_to_lamp(source, "rating", tmp_path / "x", **settings_)
    with pytest.raises(InvalidConfig, match="rating or title"):
        reviews_to_lamp(source, ["rating"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    plain = reviews_to_lamp(source, "rating", tmp_path / "plain", seed=3, k_max=2, max_users=8, test_fraction=0.25)
    numpy = reviews_to_lamp(source, "rating", tmp_path / "numpy", seed=np.int64(3), k_max=np.int32(2), max_users=np.int64(8), test_fraction=np.float32(0.25))
    assert {k: v for k, v in numpy.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}
    for name in ("train_questions.json", "test_outputs.json"):
        assert (tmp_path / "numpy" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out in (tmp_path / "loop", tmp_path / "loop" / "out"):
        with pytest.raises(InvalidData, match="(Cannot use|Cannot write) .*loop"):
            reviews_to_lamp(source, "rating", out)


def test_cli_converts_and_fails_in_one_line(tmp_path):
    source = synthetic(tmp_path / "reviews.json")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "reviews-to-lamp", "--input", str(source), "--task", "rating", "--out", str(tmp_path / "out"), "--seed", "1", "--k-max", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["splits"]["test"]["avg_profile"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json\n")
    result = runner.invoke(app, ["data", "reviews-to-lamp", "--input", str(bad), "--task", "title", "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pmeta: error:") and "line 1" in lines[0]
    result = runner.invoke(app, ["data", "reviews-to-lamp", "--input", str(source), "--task", "nope", "--out", str(tmp_path / "o3")])
    assert result.exit_code == 2 and "rating or title" in result.output


def test_input_paths_that_are_not_review_files_are_named_accurately(tmp_path, monkeypatch):
    import pmeta.data.reviews as reviews

    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "link.json").symlink_to(tmp_path / "gone.json")
    cases = [
        (folder, "is a directory, not a review file"),
        (fifo, "is a FIFO, not a regular review file"),
        (tmp_path / "link.json", "Review file not found: .*link.json \\(a symbolic link to a missing file\\)"),
        (tmp_path / "absent.json", "Review file not found"),
    ]
    for path, message in cases:
        with pytest.raises(InvalidData, match=message):
            read_reviews(path)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "reviews-to-lamp", "--input", str(folder), "--task", "rating", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output == f"pmeta: error: {folder} is a directory, not a review file; give the .json, .json.gz or .zip file itself.\n"
    result = runner.invoke(app, ["data", "reviews-to-lamp", "--input", str(fifo), "--task", "rating", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "is a FIFO" in result.output  # not a hang, not "not found"
    source = synthetic(tmp_path / "reviews.json", users=2)  # an unreadable file (tests may run as root, so open is made to refuse)
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(reviews, "open", refuse, raising=False)
    with pytest.raises(InvalidData, match=r"^Cannot read .*reviews\.json: Permission denied\.$"):
        read_reviews(source)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"Amazon Musical Instruments reviews not present at {REAL_ZIP} (they are never committed)")
def test_real_amazon_reviews_limited(tmp_path):
    counts = reviews_to_lamp(REAL_ZIP, "rating", tmp_path / "rating", max_users=60)
    assert counts["reviews_read"] == 10261 and counts["users"] == 60
    assert (counts["splits"]["test"]["users"], counts["splits"]["dev"]["users"]) == (12, 6)
    test = load_split(tmp_path / "rating", "LaMP-3", "test")
    assert all(len(e.profile) == 5 and e.output in {"1", "2", "3", "4", "5"} for e in test)
    assert all(e.profile[i]["date"] <= e.profile[i + 1]["date"] for e in test for i in range(4))
    counts = reviews_to_lamp(REAL_ZIP, "title", tmp_path / "title", max_users=60)
    train = load_split(tmp_path / "title", "LaMP-4", "train")
    assert len(train) == counts["splits"]["train"]["users"] == 42 and all(e.output for e in train)


@st.composite
def review_sets(draw):
    """Random users with 1-9 reviews each, random stars, times with ties, some empty texts."""
    lines = []
    for u in range(draw(st.integers(1, 8))):
        for n in range(draw(st.integers(1, 9))):
            text = draw(st.sampled_from(["", "fine strings", "loud amp hum", "a b c"]))
            lines.append(review(f"P{u}", n, stars=float(draw(st.integers(1, 5))), reviewText=text, unixReviewTime=draw(st.integers(0, 5)) * DAY))
    return draw(st.permutations(lines)), draw(st.integers(0, 3)), draw(st.integers(1, 4))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(review_sets())
def test_conversion_invariants(tmp_path, case):
    lines, seed, k_max = case
    source = tmp_path / "r.json"
    source.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    usable: dict[str, list[dict]] = {}
    for line in lines:
        if line["reviewText"]:
            usable.setdefault(line["reviewerID"], []).append(line)
    try:
        counts = reviews_to_lamp(source, "rating", tmp_path / "out", seed=seed, k_max=k_max, test_fraction=0.3, dev_fraction=0.2)
    except InvalidData as error:
        assert "no user has 2 or more usable reviews" in str(error) and all(len(v) < 2 for v in usable.values())
        return
    seen = set()
    for split in ("train", "dev", "test"):
        for example in load_split(tmp_path / "out", "LaMP-3", split):
            assert example.id not in seen
            seen.add(example.id)
            history = sorted(usable[example.id], key=lambda r: r["unixReviewTime"])  # stable: ties keep file order
            assert example.output == str(int(history[-1]["overall"]))
            earlier = [r for r in history[:-1] if " ".join(r["reviewText"].split()) != " ".join(history[-1]["reviewText"].split())]  # copies of its own text left out
            assert [item["asin"] for item in example.profile] == [r["asin"] for r in earlier][-(k_max if split != "train" else 100) :]
            assert not any(item["text"] == " ".join(history[-1]["reviewText"].split()) for item in example.profile)
            if split != "train":
                assert len(example.profile) == min(k_max, len(earlier))
    assert seen == {user for user, reviews in usable.items() if len(reviews) >= 2} and counts["users"] == len(seen)

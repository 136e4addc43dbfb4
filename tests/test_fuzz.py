"""The fuzz targets (pmeta.fuzz): history.json, a MovieLens folder and a dataset through the bank
build and every method, in-process and as the script users run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmeta.data import Catalog, parse_history, resolve_history
from pmeta.errors import InvalidHistory
from pmeta.fuzz import TARGETS, fuzz_history, history_inputs, main, run

REPO = Path(__file__).resolve().parents[1]


def test_the_history_target_accepts_or_rejects_everything_it_is_fed():
    report = run("history", examples=600, seed=1)
    assert report["examples"] >= 300  # hypothesis may stop early on a small search space
    assert set(report["outcomes"]) <= {"valid", "rejected"}
    assert report["outcomes"].get("valid", 0) > 0 and report["outcomes"].get("rejected", 0) > 0


@given(history_inputs())
@settings(max_examples=300, deadline=None)
def test_history_inputs_give_a_history_or_invalid_history(value):
    assert fuzz_history(value) in ("valid", "rejected")


CATALOG = Catalog([str(i) for i in range(1, 6)], ["A (1995)", "B (1995)", "B (1995)", "C", "D"], [[]] * 5)


@given(st.lists(st.fixed_dictionaries({}, optional={"item_id": st.sampled_from(["1", "2", "3", "9", 4, "x"]), "text": st.sampled_from(["a (1995)", "b (1995)", "new", " C "]), "rating": st.sampled_from([0, 3.5, 4, 5])}), max_size=8), st.booleans())
@settings(max_examples=300, deadline=None)
def test_valid_histories_resolve_or_name_their_unknown_ids(items, ignore_unknown):
    try:
        history = parse_history({"user_id": "u", "items": items})
    except InvalidHistory:
        return
    try:
        resolved = resolve_history(history, CATALOG, ignore_unknown=ignore_unknown)
    except InvalidHistory as error:
        assert not ignore_unknown and "not in the catalogue" in str(error) and "\n" not in str(error)
        return
    assert len(resolved.item_indexes) == len(set(resolved.item_indexes))
    assert all(0 <= index < len(CATALOG.item_ids) for index in resolved.item_indexes)
    assert len(resolved.ratings) == len(resolved.item_indexes) + len(resolved.texts)


def test_the_fuzz_script_runs():
    result = subprocess.run([sys.executable, "-m", "pmeta.fuzz", "history", "--examples", "100", "--seed", "3"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "history" and report["examples"] > 0


def test_the_fuzz_command_line(capsys):
    assert main(["--list"]) == 0
    assert "history" in capsys.readouterr().out and set(TARGETS) == {"history", "movielens", "evaluation", "serving", "text"}
    assert main(["nope"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_a_refusal_is_retried_in_the_modes_it_advises_until_none_is_left():
    from pmeta.errors import ModesUnavailable
    from pmeta.fuzz import in_advised_modes

    calls = []

    def evaluate(modes):
        calls.append(modes)
        if "pop99" in modes:
            raise ModesUnavailable("pop99 cannot draw", ("uni99", "full"))
        if "uni99" in modes:
            raise ModesUnavailable("uni99 cannot draw", ("full",))
        return "report"

    assert in_advised_modes(evaluate, ("uni99", "pop99", "full")) == ("report", ("full",))
    assert calls == [("uni99", "pop99", "full"), ("uni99", "full"), ("full",)]

    def refuse(modes):
        raise ModesUnavailable("cannot draw", ("full",))

    for modes in (("full",), ("pop99",)):  # advises the same modes again, or none of those asked for
        with pytest.raises(ModesUnavailable):
            in_advised_modes(refuse, modes)


def test_the_movielens_target_reads_refuses_and_evaluates():
    from pmeta.fuzz.movielens import _render, fuzz_movielens

    report = run("movielens", examples=300, seed=1)
    assert set(report["outcomes"]) <= {"rejected", "refused", "evaluated", "evaluated-uni99,full", "evaluated-full"}
    # most generated folders are refused by the reader; some reach an evaluation (refusals after
    # reading are rare, under 1%: the four outcomes are checked one by one below)
    assert report["outcomes"].get("rejected", 0) > 0 and report["outcomes"].get("evaluated", 0) + report["outcomes"].get("evaluated-full", 0) > 0, report
    wide, narrow, sparse = (_render((fmt, "auto", block, [], [], True, ("none",))) for fmt, block in (("ml-1m", "wide"), ("ml-100k", "narrow"), ("ml-latest", "sparse")))
    assert fuzz_movielens(wide) == "evaluated"  # 150 films: every mode draws its candidates
    assert fuzz_movielens(narrow) == "evaluated-full"  # 10 films: full ranking alone, as advised
    assert fuzz_movielens(sparse) == "evaluated-uni99,full"  # 40 of 150 films rated: pop99 cannot draw 99
    assert fuzz_movielens(("ml-latest", "auto", b"\x00\x01", b"")) == "rejected"


def test_the_movielens_target_catches_a_report_of_nans(monkeypatch):
    """Without the up-front case check a dataset with no test case gave report.json NaNs."""
    from pmeta.eval import runner
    from pmeta.fuzz.movielens import fuzz_movielens

    one_user = ("ml-latest", "auto", b"movieId,title,genres\n95,Heat (1995),Drama\n", b"userId,movieId,rating,timestamp\n495,95,1,0\n")
    assert fuzz_movielens(one_user) == "refused"
    monkeypatch.setattr(runner, "check_cases", lambda dataset, users, modes: 0)
    with pytest.raises(ValueError, match="not JSON compliant"):
        fuzz_movielens(one_user)


SHAPE = {"seed": 3, "items": 150, "users": 40, "most_rated": 30, "positives": "most", "times": "spread", "titles": "distinct"}
BANK = {"cf_init": "onboarding", "cf_rank": 4, "meta": "maml", "anchors": 2, "top_k": 3, "key_space": "collaborative", "fusion": "cat", "inner_steps": 1, "crossfit_folds": 0, "tower_steps": 2, "global_steps": 2, "anchor_steps": 2, "stack_steps": 2}


def test_the_evaluation_target_builds_evaluates_transfers_and_refuses():
    from pmeta.fuzz.evaluation import fuzz_evaluation

    assert fuzz_evaluation((SHAPE, BANK, False)) == "evaluated"
    # 30 films: full ranking alone; text keys and a text-only bank (rank 0), SVD fusion, Reptile,
    # served on another catalogue whose first 15 titles are the bank's last 15 (matched by title)
    small = {**SHAPE, "items": 30}
    text_only = {**BANK, "cf_init": "puresvd", "cf_rank": 0, "key_space": "text", "fusion": "svd", "meta": "reptile"}
    assert fuzz_evaluation((small, text_only, True)) == "transfer-evaluated-full"
    assert fuzz_evaluation(({**SHAPE, "positives": "few", "users": 4}, BANK, False)) == "refused"  # no test case


def test_the_evaluation_target_catches_a_diverged_build(monkeypatch):
    """SVD fusion used to differentiate torch.linalg.svd of the dense ΔW, whose repeated zero
    singular values gave NaN gradients: a fusion=svd build diverged (or, with early stopping, ended
    the stage meta-trained through fusion at its first step). A diverged build is a bug to the
    target, not a refusal."""
    from pmeta.errors import TrainingDiverged
    from pmeta.fusion import fuse
    from pmeta.fuzz.evaluation import fuzz_evaluation

    def dense_svd(anchors, indexes, weights, rank):
        exact = fuse.fuse_cat(anchors, indexes, weights)
        out = {"prompt": exact["prompt"]}
        for key in [k for k in exact if k.endswith(".A")]:
            u, s, vh = torch.linalg.svd(exact[key[:-2] + ".B"] @ exact[key], full_matrices=False)
            out[key[:-2] + ".B"], out[key] = u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
        return out

    monkeypatch.setattr(fuse, "fuse_svd", dense_svd)
    with pytest.raises(TrainingDiverged):
        fuzz_evaluation((SHAPE, {**BANK, "fusion": "svd"}, False))


# one history of every kind of item (catalogue positions are taken modulo the catalogue's size),
# candidates with a repeat, two of them as JSON integers; and a history naming an unknown id alone
EVERY_KIND = [("id", 0, "x", 5.0, 1_000_000), ("int-id", 1, "x", None, None), ("title", 2, "x", 4.0, None), ("recased-title", 3, "x", 1.0, 5), ("id+text", 4, "Some film", 3.5, None), ("unknown+text", 5, "Not a catalogue title", 5.0, 7), ("text", 6, "Heat (1995)", None, None)]
UNKNOWN = [("unknown", 9, "x", 5.0, None)]


def test_the_serving_target_personalizes_ranks_and_refuses(opened_bank, monkeypatch):
    from pmeta.fuzz import serving

    monkeypatch.setitem(serving._BANK, "bank", opened_bank)
    report = run("serving", examples=12, seed=1)
    assert set(report["outcomes"]) <= {"personalized", "refused"} and report["outcomes"].get("personalized", 0) > 0, report
    candidates = ([10, 11, 11, 0, 12], False, [1, 3])
    assert serving.fuzz_serving(([EVERY_KIND, [], EVERY_KIND[:2]], False, None, 2, 5, candidates)) == "personalized"
    assert serving.fuzz_serving(([EVERY_KIND[:3], UNKNOWN], False, 1, 1, 3, None)) == "refused"
    assert serving.fuzz_serving(([EVERY_KIND[:3], UNKNOWN], True, 0, 3, 3, (candidates[0], True, []))) == "personalized"


def test_the_serving_target_serves_a_bank_opened_in_bfloat16(tiny_bank, monkeypatch):
    """``$PMETA_FUZZ_PRECISION=bfloat16``: the encoder passes run under bf16 autocast and the
    batched, vmap and one-by-one passes are held to bf16's precision (2⁻⁸), not float32's 1e-4."""
    from pmeta.fuzz import serving

    monkeypatch.setenv("PMETA_FUZZ_BANK", str(tiny_bank))
    monkeypatch.setenv("PMETA_FUZZ_PRECISION", "bfloat16")
    monkeypatch.setattr(serving, "_BANK", {})
    served = serving.bank()
    assert served.model.precision == "bfloat16" and serving.TOLERANCES["bfloat16"] == (2**-8, 2**-8)
    report = run("serving", examples=6, seed=2)
    assert set(report["outcomes"]) <= {"personalized", "refused"} and report["outcomes"].get("personalized", 0) > 0, report
    assert serving.fuzz_serving(([EVERY_KIND, [], EVERY_KIND[:2]], False, None, 2, 5, ([10, 11, 0], False, [1]))) == "personalized"


def test_the_serving_target_catches_a_history_item_left_in_the_ranking(opened_bank, monkeypatch):
    """A title matched only in its stored case would leave a re-cased title's film rankable."""
    from pmeta.data import history
    from pmeta.fuzz import serving

    monkeypatch.setattr(history, "_title_index", lambda catalog: {title: i for i, title in reversed(list(enumerate(catalog.titles)))})
    with pytest.raises(AssertionError, match="-inf scores are not the history's items"):
        serving.fuzz_serving(([EVERY_KIND], False, None, 1, 5, None), served=opened_bank)


# LaMP profiles for the text target: (id kind, number, free text, field kinds, score, date kind,
# (year, month, day, hour, number), extra key?); their dates put the second item first
PROFILE = [
    ("str", 1, "great strings", ["text", "text"], "5", "ymd", (2015, 1, 2, 0, 0), False),
    ("int", 2, "noisy cable", ["text", "text"], 1, "ymd", (2014, 3, 4, 0, 0), True),
    ("padded", 3, "", ["empty", "empty"], " 4 ", "ymd", (2016, 5, 6, 0, 0), False),
]
PLAIN = ((None, False), (None, False), (None, False), ("prefixed", "works fine"))


@pytest.fixture(scope="module")
def text_banks(tmp_path_factory):
    """Tiny LaMP-3 (rating) and LaMP-4 (generation) text banks on one tiny random Llama."""
    from pmeta.fuzz.lamp_tiny import tiny_llama, write_lamp
    from pmeta.text import TextBank, build_text_bank, load_text_config

    root = tmp_path_factory.mktemp("fuzz-text")
    lm = tiny_llama(root / "llama")
    banks = {}
    for task, top_k in (("LaMP-3", 2), ("LaMP-4", 1)):  # top 1 of 2 anchors: the zero-history prior fuses a wider rank
        build_text_bank(write_lamp(root / task, task=task), root / f"bank-{task}", load_text_config("tiny", overrides={"task": task, "lm": str(lm), "top_k": top_k}))
        banks[task] = TextBank.open(root / f"bank-{task}")
    return banks


@pytest.mark.parametrize("task", ["LaMP-3", "LaMP-4"])
def test_the_text_target_personalizes_prompts_predicts_and_refuses(text_banks, task, monkeypatch):
    from pmeta.fuzz import text

    monkeypatch.setitem(text._BANK, "bank", text_banks[task])
    report = run("text", examples=12, seed=1)
    assert set(report["outcomes"]) <= {"personalized", "refused", "refused-request"} and report["outcomes"].get("personalized", 0) > 0, report
    served = text_banks[task]
    histories = [("object", "str", 7, PROFILE), ("list", "absent", 0, []), ("object", "int", 9, PROFILE[:1])]
    assert text.fuzz_text((histories, *PLAIN), served) == "personalized"
    _, expected = text.render((histories, *PLAIN), served.model.spec)
    assert expected == [("user-7", ["2", "r1", " r3 "]), ("anonymous", []), ("9", ["r1"])]  # by date
    if task == "LaMP-4":  # top 1: the zero-history prior's fused rank is wider; a batch drops the others' padding
        rendered = text.render((histories, *PLAIN), served.model.spec)[0]
        alone, mixed = served.personalize(rendered[0]).adapter, served.personalize_many(rendered)
        key = next(k for k in alone if k.endswith(".A"))
        assert mixed[1].adapter[key].shape[0] > mixed[0].adapter[key].shape[0] == alone[key].shape[0]
    one_kept = (histories, (1, False), (1, False), (2, False), ("surrogate", ""))  # a lone surrogate in the input: refused per call
    assert text.render(one_kept, served.model.spec)[1][0] == ("user-7", [" r3 "])
    assert text.fuzz_text(one_kept, served) == "personalized"
    repeated = PROFILE + [("repeat-retyped", 4, "x", ["text", "text"], "3", "absent", (2000, 1, 1, 0, 0), False)]
    assert text.fuzz_text(([("object", "str", 1, PROFILE[:2])], *PLAIN), served) == "personalized"  # an int id, then...
    assert text.fuzz_text(([("object", "str", 1, repeated[1:2] + repeated[-1:])], *PLAIN), served) == "refused"  # ...its digits again
    assert text.fuzz_text(([("object", "bool", 1, PROFILE)], *PLAIN), served) == "refused"
    assert text.fuzz_text(([("list", "bool", 1, PROFILE)], *PLAIN), served) == "personalized"  # a bare list: no user id to break
    assert text.fuzz_text(([("object", "str", 1, PROFILE)], (True, True), *PLAIN[1:]), served) == "refused-request"


def test_the_text_target_catches_a_profile_left_in_file_order(text_banks, monkeypatch):
    """Profiles are served in time order when every date orders: with the sort taken out, the
    target sees the history's items in the order given."""
    from pmeta.data import lamp
    from pmeta.fuzz import text

    monkeypatch.setattr(lamp, "_time_ordered", lambda profile: profile)
    with pytest.raises(AssertionError, match="not the history's items in time order"):
        text.fuzz_text(([("object", "str", 7, PROFILE)], *PLAIN), text_banks["LaMP-3"])

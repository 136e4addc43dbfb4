"""Text banks (LaMP-format tasks on a causal LM), on tiny hand-written LaMP files and a tiny random
Llama: build -> open -> personalize -> predict -> export, integrity, history validation, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pmeta.fuzz.lamp_tiny import RATING_PREFIX, tiny_llama, write_lamp
from typer.testing import CliRunner

from pmeta.cli import app
from pmeta.errors import BankIntegrityError, BankNotFound, InvalidHistory, InvalidRequest

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-bank")
    lm_dir = tiny_llama(root / "llama")
    data = write_lamp(root / "lamp3")
    bank = root / "bank"
    result = runner.invoke(app, ["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", str(data), "--preset", "tiny", "--lm", str(lm_dir), "--out", str(bank), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "built text bank version" in result.output
    return {"root": root, "lm": lm_dir, "data": data, "bank": bank}


@pytest.fixture(scope="module")
def opened(setup):
    from pmeta.text.bank import TextBank

    return TextBank.open(setup["bank"])


def _profile(data: Path, split: str = "test", row: int = 0) -> tuple[dict, dict]:
    question = json.loads((data / f"{split}_questions.json").read_text())[row]
    return question, {"user_id": "u-1", "profile": question["profile"]}


def test_build_record_and_storage(setup, opened):
    from pmeta.storage import BankStore
    from pmeta.text import bank_kind

    assert bank_kind(setup["bank"]) == "text"
    reader = BankStore(setup["bank"]).open()
    config = reader.record["config"]
    assert config["kind"] == "text" and config["task"] == "LaMP-3" and config["lm"] == str(setup["lm"])
    assert config["input_prefix"] == RATING_PREFIX  # learned from the train inputs
    assert config["rating_decode"] in ("argmax", "expected")
    assert len(reader.record["held_out_users"]) == 4  # the test split, recorded, never trained on
    build = reader.read_json("build.json")
    assert not set(build["train_users"]) & set(build["validation_users"])
    trials = {float(k): v for k, v in build["chosen"]["inner_lr_trials"].items()}
    assert {0.25, 1.0, 4.0} <= set(trials) and build["chosen"]["inner_lr_factor"] == min(trials, key=trials.get)
    assert BankStore(setup["bank"]).verify()["ok"]
    info = opened.info()
    assert info["kind"] == "text" and info["anchors"] == 2
    # every LoRA tensor carries an anchor axis; keys are the LM's targets
    shapes = {k for k, _, _ in opened.model.lm.lora_shapes()}
    assert {k[:-2] for k in opened.model.t.anchors if k != "prompt"} == shapes


def test_personalize_predict(setup, opened):
    question, history = _profile(setup["data"])
    p = opened.personalize(history)
    assert p.user_id == "u-1"
    assert len(p.anchors) == 2 and abs(sum(a["weight"] for a in p.anchors) - 1) < 1e-4
    config = opened.config
    rank = config.top_k * config.anchor_rank + config.stack_rank
    a_key = next(k for k in p.adapter if k.endswith(".A"))
    assert p.adapter[a_key].shape[0] == rank  # fused anchors + stacked adapter, exact concatenation
    for retrieve in (0, 2):
        prediction = p.predict(question["input"], retrieve=retrieve)
        assert 1.0 <= float(prediction) <= 5.0
    with pytest.raises(InvalidRequest):
        p.predict("", retrieve=0)
    asked = []
    original = opened.model.query_prompt
    opened.model.query_prompt = lambda text, profile, retrieve: asked.append(retrieve) or original(text, profile, retrieve)
    try:  # without `retrieve`, the bank's default, as in `prompt` and `pmeta adapt`
        p.predict(question["input"])
        p.predict(question["input"], retrieve=0)
    finally:
        del opened.model.query_prompt
    assert asked == [config.retrieve, 0] and config.retrieve > 0
    with pytest.raises(InvalidRequest):
        p.predict(question["input"], retrieve=-1)
    # deterministic, and a batch equals one user at a time
    again = opened.personalize(history)
    _, other = _profile(setup["data"], row=1)
    many = opened.personalize_many([history, other])
    single = opened.personalize(other)
    for key in p.adapter:
        assert torch.equal(p.adapter[key], again.adapter[key])
        assert torch.allclose(many[0].adapter[key], p.adapter[key], atol=1e-5)
        assert torch.allclose(many[1].adapter[key], single.adapter[key], atol=1e-5)


def test_personalize_inside_torch_inference_mode(setup, opened):
    """A serving layer's `with torch.inference_mode():` used to make the inner steps fail (no autograd
    there): the same adapter and prediction as outside it now."""
    question, history = _profile(setup["data"])
    outside = opened.personalize(history)
    with torch.inference_mode():
        inside = opened.personalize(history)
        prediction = inside.predict(question["input"])
    for key in outside.adapter:
        assert torch.equal(inside.adapter[key], outside.adapter[key])
    assert prediction == outside.predict(question["input"])


def test_the_bank_keeps_no_users_text_after_the_call(setup, opened):
    """Formatted support prompts (the user's own review text) were memoised on the opened bank for
    every later request (up to 50,000 of them): now only within one personalize call, with the same
    adapter as with a memo."""
    question, history = _profile(setup["data"])
    marker = "zqxj private note " + "".join(str(ord(c)) for c in "marker")
    history["profile"] = [{**item, "text": f"{item['text']} {marker}"} for item in history["profile"]]
    first = opened.personalize(history)
    assert opened.model.prompt_cache is None
    assert not any(marker in str(key) for key in vars(opened.model).get("_formatted", {}))
    again = opened.personalize(history)
    for key in first.adapter:
        assert torch.equal(first.adapter[key], again.adapter[key])
    opened.model.prompt_cache = {}  # a build's memo gives the same adapter
    try:
        memoised = opened.personalize(history)
    finally:
        opened.model.prompt_cache = None
    for key in first.adapter:
        assert torch.equal(first.adapter[key], memoised.adapter[key])


def test_inner_steps_fit_the_support(setup, opened):
    """The inner steps lower the support loss from the fused start (with the bank's step sizes)."""
    _, history = _profile(setup["data"])
    model = opened.model
    pairs = [model.support_pairs(history["profile"])]
    before = opened.personalize(history, steps=0)
    after = opened.personalize(history, steps=2)
    with torch.no_grad():
        loss_before = float(model.pairs_loss(pairs, before._batched()))
        loss_after = float(model.pairs_loss(pairs, after._batched()))
    assert loss_after < loss_before


def test_empty_profile_gets_the_prior(opened):
    p = opened.personalize({"user_id": "new", "profile": []})
    assert p.anchors == []
    assert 1.0 <= float(p.predict(f"{RATING_PREFIX} works fine", retrieve=2)) <= 5.0
    builds = opened.model.prior_cache.builds
    again = opened.personalize({"user_id": "again", "profile": []})  # the opened bank's prior is kept
    assert opened.model.prior_cache.builds == builds >= 1
    for key, value in p.adapter.items():
        assert torch.equal(again.adapter[key], value), key


def test_empty_profiles_are_personalized_apart_and_returned_in_input_order(setup, opened, monkeypatch):
    """The prior's rank spans every anchor, so empty profiles go in their own pass: the profiled
    users' inner steps run at their own rank. Results come back in the input order, each user's
    factors the same as alone."""
    _, first = _profile(setup["data"], row=0)
    _, second = _profile(setup["data"], row=1)
    empty = {"user_id": "new", "profile": []}
    passes = []
    original = opened.model.personalize

    def recording(profiles, *args, **kwargs):
        passes.append([len(p) > 0 for p in profiles])
        return original(profiles, *args, **kwargs)

    monkeypatch.setattr(opened.model, "personalize", recording)
    mixed = opened.personalize_many([first, empty, second])
    assert passes == [[True, True], [False]]
    assert [p.user_id for p in mixed] == [first["user_id"], "new", second["user_id"]]
    assert [bool(p.anchors) for p in mixed] == [True, False, True]
    for history, p in zip([first, empty, second], mixed):
        alone = opened.personalize(history)
        assert {k: v.shape for k, v in p.adapter.items()} == {k: v.shape for k, v in alone.adapter.items()}
        for key, value in p.adapter.items():
            torch.testing.assert_close(value, alone.adapter[key], atol=1e-4, rtol=1e-4)
    assert all(v >= 0 for v in mixed[0].timing_ms.values()) and mixed[0].timing_ms == mixed[2].timing_ms


def test_meta_training_fuses_the_anchors_serving_does(opened):
    """The stack stage's fixed part is what serving fuses: the retrieved anchors for a user with a
    key, the zero-history prior for one without (a zero key row)."""
    import numpy as np

    from pmeta.text.build import Episode, _stage_stack

    keys = opened.model.user_keys([[{"id": "1", "text": "works fine", "score": "4"}], []])
    assert np.linalg.norm(keys, axis=1).tolist()[1] == 0
    _, fixed, _ = _stage_stack(opened.model)(Episode(users=[0, 1], support=[[], []], query=[[], []], keys=keys))
    served, details = opened.model.fused(keys)
    assert details["fused_ranks"] is not None
    for key, value in served.items():
        assert torch.equal(fixed[key], value), key


@pytest.mark.parametrize(
    "history, message",
    [
        ({"user_id": "u", "profile": [{"id": "1", "text": "ok", "score": "9"}]}, "profile[0].score"),
        ({"user_id": "u", "profile": [{"id": "1", "score": "4"}]}, "missing field 'text'"),
        ({"user_id": "../x", "profile": []}, "user_id"),
        ({"user_id": "u", "items": []}, "items"),
        (42, "expected a JSON object"),
        ({"user_id": "u", "profile": [{"id": "1", "text": "ok \udfff", "score": "4"}]}, "lone UTF-16 surrogate"),
    ],
)
def test_history_errors(opened, history, message):
    with pytest.raises(InvalidHistory, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        opened.personalize(history)


def test_request_errors_are_typed(setup, opened, tmp_path, monkeypatch):
    history = {"user_id": "u", "profile": []}
    for histories in (history, "abc", None):  # a dict or a string is not a list of histories
        with pytest.raises(InvalidRequest, match="histories must be a list"):
            opened.personalize_many(histories)
    for max_items in ("2", 1.5, -1, True):
        with pytest.raises(InvalidRequest, match="max_items must be a whole number >= 0"):
            opened.personalize(history, max_items=max_items)
    p = opened.personalize(history)
    with pytest.raises(InvalidRequest, match="valid Unicode text"):
        p.predict(f"{RATING_PREFIX} works \udfff fine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="is a file, not a directory"):
        p.export_peft(tmp_path / "file")
    with pytest.raises(InvalidRequest, match="is not a directory"):
        p.export_peft(tmp_path / "file" / "sub")
    # what the operating system refuses, and paths of the wrong type: typed, nothing left behind
    before = sorted(tmp_path.iterdir())
    for target, message in ((tmp_path / ("a" * 300), "cannot export to .*(too long|File name)"), ("/proc/pmeta-adapter", "cannot export to /proc/pmeta-adapter: No such file"),
                            (str(tmp_path / "a\x00b"), "NUL byte"), (3, "must be a path"), (None, "must be a path")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=message):
            p.export_peft(target)
    assert sorted(tmp_path.iterdir()) == before
    # a full disk is the machine's state, not a bad request: it stays the OSError it is
    import errno

    import pmeta.export

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pmeta.export, "_write", full_disk)
    with pytest.raises(OSError, match="No space left") as raised:
        p.export_peft(tmp_path / "adapter")
    assert not isinstance(raised.value, InvalidRequest)


def test_steps_paths_and_batches_are_checked(setup, opened):
    from pmeta.config import MAX_INNER_STEPS
    from pmeta.text.bank import TextBank

    history = {"user_id": "u", "profile": []}
    for steps in (MAX_INNER_STEPS + 1, 10**9, -1, "2", True):
        with pytest.raises(InvalidRequest, match=f"steps must be a whole number from 0 to {MAX_INNER_STEPS}"):
            opened.personalize(history, steps=steps)
    for path in (3, None, b"bank"):
        with pytest.raises(InvalidRequest, match="must be a path"):
            TextBank.open(path)
    question, good = _profile(setup["data"])
    bad = {"user_id": "u2", "profile": [{"id": "x", "text": 5, "score": "5"}]}
    with pytest.raises(InvalidHistory, match=r"^histories\[1\]: "):
        opened.personalize_many([good, bad])
    for retrieve in (-1, "2", 1.5):
        with pytest.raises(InvalidRequest, match="retrieve must be a whole number >= 0"):
            opened.personalize(good).predict(question["input"], retrieve=retrieve)


def test_history_files_are_read_strictly(setup, tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    duplicate = tmp_path / "dup.json"
    duplicate.write_text('{"user_id": "u1", "profile": [{"id": "p1", "text": "great", "score": "5"}], "profile": []}')
    big = tmp_path / "big.json"
    big.write_text('{"user_id": "u1", "profile": [{"id": "p1", "text": "great", "score": "5", "date": ' + "9" * 5000 + "}]}")
    for path, message in ((fifo, "not a regular file"), (duplicate, "the key 'profile' appears twice"), (big, "Exceeds the limit")):
        result = runner.invoke(app, ["adapt", "--bank", str(setup["bank"]), "--history", str(path), "--input", "x"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1


def test_a_profile_item_id_may_appear_once():
    from pmeta.text.history import parse_text_history

    twice = {"user_id": "t1", "profile": [{"id": "x", "text": "good", "score": "5"}, {"id": "x", "text": "bad", "score": "1"}]}
    with pytest.raises(InvalidHistory, match=r"^history: profile: item id 'x' appears twice, at profile\[0\] and profile\[1\]$"):
        parse_text_history(twice, "LaMP-3")
    dated = [  # positions are those of the file, not of the time order; 7 and "7" are one id
        {"id": 7, "text": "a", "score": "5", "date": "2020"},
        {"id": "y", "text": "b", "score": "4", "date": "2019"},
        {"id": "7", "text": "c", "score": "3", "date": "2018"},
    ]
    with pytest.raises(InvalidHistory, match=r"item id '7' appears twice, at profile\[0\] and profile\[2\]"):
        parse_text_history(dated, "LaMP-3")
    _, items = parse_text_history({"user_id": "t1", "profile": dated[:2]}, "LaMP-3")
    assert [item["id"] for item in items] == ["y", "7"]


def test_an_absent_profile_is_the_empty_profile_like_absent_items(tmp_path):
    """Both history formats read a missing list as an empty one (the zero-history prior), while a
    misspelt key is refused (``extra="forbid"``)."""
    from pmeta.data.history import parse_history
    from pmeta.text.history import load_text_history, parse_text_history

    path = tmp_path / "h.json"
    path.write_text('{"user_id": "t1"}')
    assert load_text_history(path, "LaMP-3")[1] == [] and parse_history({"user_id": "t1"}).items == []
    assert parse_text_history({"user_id": "t1", "profile": []}, "LaMP-3")[1] == []
    assert parse_text_history([], "LaMP-3")[1] == []  # the bare-list form
    assert parse_text_history([{"id": "1", "text": "ok", "score": "4"}], "LaMP-3")[0].user_id == "anonymous"
    with pytest.raises(InvalidHistory, match=r"^history: profle: Extra inputs are not permitted"):
        parse_text_history({"user_id": "t1", "profle": []}, "LaMP-3")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[" * 200_000 + b"]" * 200_000, r"h\.json: the JSON is nested too deeply\.$"),
        (b'{"user_id": ' + b"[" * 200_000, r"h\.json: the JSON is nested too deeply\.$"),
        (b"", r"h\.json: the file is empty; expected a JSON object with user_id and profile\.$"),
        (b" \n\t", r"h\.json: the file is empty; expected a JSON object with user_id and profile\.$"),
        ('{"user_id": "café", "profile": []}'.encode("latin-1"), r"h\.json: not UTF-8 text \(invalid byte at offset 16\)\.$"),
        (b'{"user_id": "t1",\n "profile": [}', r"h\.json: invalid JSON at line 2 column 14: Expecting value\.$"),
        (b'{"user_id": "t1", "profile": [], "user_id": "t2"}', r"h\.json: invalid JSON: the key 'user_id' appears twice in one object\.$"),
    ],
)
def test_history_files_that_are_not_json_are_worded_like_ranking_histories(tmp_path, content, message):
    from pmeta.text.history import load_text_history

    path = tmp_path / "h.json"
    path.write_bytes(content)
    with pytest.raises(InvalidHistory, match=message) as caught:
        load_text_history(path, "LaMP-3")
    text = str(caught.value)
    assert "\n" not in text and "codec" not in text and "char " not in text and "recursion" not in text


def test_golds_outside_the_labels_are_refused_before_meta_training(setup, tmp_path):
    """A train gold "4.0" matched no option and dropped out of every loss without a word (a bank
    trained on nothing: validation loss 0.000 -> 0.000); a bad dev gold was refused only after the
    whole meta-training. Golds are read as the labels spell them, or refused before the build starts."""
    from pmeta.data.lamp import LAMP2_TAGS, LampExample
    from pmeta.errors import InvalidData
    from pmeta.text.build import checked_golds, read_train_dev

    data = write_lamp(tmp_path / "lamp3")
    path = data / "train_outputs.json"
    outputs = json.loads(path.read_text())
    outputs["golds"][0]["output"], outputs["golds"][1]["output"] = "4.0", " 2 "
    path.write_text(json.dumps(outputs))
    train, dev = read_train_dev(data, "LaMP-3")
    assert {e.output for e in train + dev} <= {"1", "2", "3", "4", "5"}
    assert (train[0].id, train[0].output, train[1].output) == (outputs["golds"][0]["id"], "4", "2")
    path = data / "dev_outputs.json"
    outputs = json.loads(path.read_text())
    outputs["golds"][0]["output"] = "great"
    path.write_text(json.dumps(outputs))
    args = ["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", str(data), "--lm", str(setup["lm"]), "--preset", "tiny", "--out", str(tmp_path / "b")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "dev_outputs.json at the output of question id" in result.output and "found 'great'" in result.output, result.output
    assert not (tmp_path / "b").exists()
    tagged = [LampExample("q1", "a film", [], f"  {LAMP2_TAGS[0]} "), LampExample("q2", "a film", [], "Comedy")]
    with pytest.raises(InvalidData, match="LaMP-2 outputs are one of .* found 'Comedy'"):
        checked_golds(tagged, tmp_path, "LaMP-2", "train")
    assert tagged[0].output == LAMP2_TAGS[0]  # stripped as the labels spell it


def test_the_lm_window_holds_the_prompt_budget(setup, tmp_path):
    """max_prompt_tokens may be up to 4,096, but the LM took 512 tokens whatever the budget and cut a
    longer prompt from the left, instruction first: the window now holds the budget and the answer,
    within the model's positions; banks of different budgets share one LM at the widest window."""
    from pmeta.text import load_text_config
    from pmeta.text.bank import shared_lm
    from pmeta.text.build import lm_window

    wide = tmp_path / "llama-4096"  # the tiny Llama with 4,096 positions (RoPE: no weight depends on them)
    shutil.copytree(setup["lm"], wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    small = load_text_config("tiny", overrides={"task": "LaMP-3", "lm": str(wide)})
    large = small.model_copy(update={"max_prompt_tokens": 2000})
    huge = small.model_copy(update={"max_prompt_tokens": 4096})
    assert (lm_window(small), lm_window(large), lm_window(huge)) == (512, 2256, 4352)
    lm = shared_lm(small)
    assert lm.max_length == 512
    assert shared_lm(large) is lm and lm.max_length == 2256  # one copy of the weights, widened
    assert shared_lm(small) is lm and lm.max_length == 2256  # never narrowed again
    assert shared_lm(huge) is lm and lm.max_length == 4096  # never beyond the model's positions


def test_text_banks_refuse_a_gpu_on_every_machine(setup, tmp_path):
    """Their GPU path mixes devices (CPU tensors beside a GPU model) and was never run on a GPU:
    refused in the same words whether or not this machine has one (the CLI cases: test_cli_errors)."""
    from pmeta.errors import InvalidConfig
    from pmeta.text import load_text_config
    from pmeta.text.bank import TextBank
    from pmeta.text.build import build_text_bank

    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(InvalidConfig, match="text banks run on the CPU only"):
            TextBank.open(setup["bank"], device=device)
    config = load_text_config("tiny", overrides={"task": "LaMP-3", "lm": str(setup["lm"]), "device": "cuda"})
    with pytest.raises(InvalidConfig, match="text banks run on the CPU only"):
        build_text_bank(setup["data"], tmp_path / "b", config)
    assert not (tmp_path / "b").exists()
    with pytest.raises(InvalidConfig, match="unknown torch device"):
        TextBank.open(setup["bank"], device="gpu0")


def test_a_text_build_under_torchrun_is_refused(setup, tmp_path):
    args = ["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", str(setup["data"]), "--lm", str(setup["lm"]), "--out", str(tmp_path / "b")]
    result = runner.invoke(app, args, env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "run in one process" in result.output, result.output
    assert not (tmp_path / "b").exists()


def test_a_swapped_base_model_is_refused(setup, tmp_path):
    from pmeta.errors import BankIntegrityError
    from pmeta.text.bank import TextBank

    from pmeta.models.causal_lm import CausalLM

    other = CausalLM(str(tiny_llama(tmp_path / "other-llama", seed=1)))
    with pytest.raises(BankIntegrityError, match="other weights than the model now at"):
        TextBank.open(setup["bank"], lm=other)
    assert TextBank.open(setup["bank"], lm=CausalLM(str(setup["lm"]))).version  # the same weights, loaded again: accepted


def test_integrity_and_kinds(setup, tmp_path):
    from pmeta import Bank
    from pmeta.text.bank import TextBank

    with pytest.raises(BankNotFound):
        TextBank.open(tmp_path / "nothing")
    with pytest.raises(InvalidRequest, match="text bank"):
        Bank.open(setup["bank"])  # a text bank is not a MovieLens bank: the error says which to use
    copy = tmp_path / "bank"
    shutil.copytree(setup["bank"], copy)
    tensors = next(copy.glob("versions/*/tensors.safetensors"))
    tensors.chmod(0o644)
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(BankIntegrityError):
        TextBank.open(copy)
    result = runner.invoke(app, ["bank", "verify", str(copy)])
    assert result.exit_code == 2 and "failed verification" in result.output


def test_export_peft_roundtrip(setup, opened, tmp_path):
    """PeftModel.from_pretrained(base, DIR) gives pmeta's in-memory logits (LoRA only) to 1e-4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    question, history = _profile(setup["data"])
    p = opened.personalize(history)
    out = p.export_peft(tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    lm = opened.model.lm
    ids, mask = lm._pad(lm._encode_prompts([lm.format_prompt(question["input"])]), "right")
    lora_only = {k: v.unsqueeze(0) for k, v in p.adapter.items() if k != "prompt"}
    ours = lm.logits(ids, mask, lora_only)
    base = AutoModelForCausalLM.from_pretrained(setup["lm"], attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, out).eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, lm.logits(ids, mask, None), atol=1e-4)  # the adapter does change the model


@pytest.mark.parametrize("decode", ["argmax", "expected"])
def test_an_export_folder_alone_reproduces_the_prediction(setup, opened, tmp_path, monkeypatch, decode, readme_prediction):
    """The exported README's code, run as written (load with PEFT, splice the soft prompt, score the
    labels, add the label prior, decode as ``pmeta_export.json`` says), gives pmeta's prediction."""
    monkeypatch.setattr(opened.model, "config", opened.model.config.model_copy(update={"rating_decode": decode}))
    question, history = _profile(setup["data"])
    p = opened.personalize(history)
    assert any(bool(v.abs().sum() > 0) for k, v in p.adapter.items() if k.endswith(".B"))
    out = p.export_peft(tmp_path / "adapter")
    meta = json.loads((out / "pmeta_export.json").read_text())
    assert meta["prediction"] == {
        "task": "LaMP-3", "kind": "rating", "labels": opened.model.labels, "decode": decode, "max_new_tokens": None,
        "retrieve": opened.config.retrieve, "max_length": opened.model.lm.max_length,
    }
    blocks, scope = readme_prediction((out / "README.md").read_text(), p.prompt(question["input"]), tmp_path)
    assert len(blocks) == 3 and f"# decode: {decode}" in blocks[2]
    ours = p.predict(question["input"])
    if decode == "argmax":
        assert scope["prediction"] == ours
    else:
        assert "." in scope["prediction"] and float(scope["prediction"]) == pytest.approx(float(ours), abs=1.1e-3)  # a rating, not a label


def test_the_prompt_token_counter_holds_the_lm_tokenizer_lock(opened, monkeypatch):
    """Every call into the LM's (fast, not thread-safe) tokenizer holds its lock, the prompt builder's too."""
    import threading

    entered = []

    class Recording:
        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            entered.append(self.lock.acquire())

        def __exit__(self, *exc):
            self.lock.release()

    monkeypatch.setattr(opened.model.lm, "_tokenizer_lock", Recording())
    count = opened.model._count_tokens()
    assert count("a short review") > 0 and entered == [True]


def test_cli_adapt_and_export(setup, tmp_path):
    question, history = _profile(setup["data"])
    path = tmp_path / "h.json"
    path.write_text(json.dumps(history))
    bank = str(setup["bank"])
    result = runner.invoke(app, ["adapt", "--bank", bank, "--history", str(path), "--input", question["input"], "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["task"] == "LaMP-3" and 1.0 <= float(out["prediction"]) <= 5.0 and len(out["anchors"]) == 2
    result = runner.invoke(app, ["adapt", "--bank", bank, "--history", str(path), "--input", question["input"], "--retrieve", "1"])
    assert result.exit_code == 0 and "personalized in" in result.output
    result = runner.invoke(app, ["export", "--bank", bank, "--history", str(path), "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    for info in (["bank", "info", bank], ["bank", "verify", bank]):
        assert runner.invoke(app, info).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["adapt", "--bank", "{bank}", "--history", "{history}"], "needs --input"),
        (["adapt", "--bank", "{bank}", "--history", "{bad}", "--input", "x"], "profile[0].score"),
        (["adapt", "--bank", "{bank}", "--history", "{missing}", "--input", "x"], "History file not found"),
        (["adapt", "--bank", "{bank}", "--history", "{history}", "--input", "x", "--top", "3"], "--top applies to ranking banks"),
        (["adapt", "--bank", "{bank}", "--history", "{history}", "--input", "x", "--ignore-unknown"], "--ignore-unknown applies to ranking banks"),
        (["eval", "lamp", "--bank", "{bank}", "--data", "{data}", "--task", "LaMP-3", "--preset", "huge", "--out", "{tmp}/b"], "unknown preset 'huge'"),
        (["bank", "build", "--format", "lamp", "--data", "{data}", "--out", "{tmp}/b"], "needs --task"),
        (["bank", "build", "--format", "lamp", "--task", "LaMP-9", "--data", "{data}", "--out", "{tmp}/b"], "Unknown LaMP task"),
        (["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", "{tmp}", "--out", "{tmp}/b"], "train_questions.json"),
        (["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", "{data}", "--lm", "{tmp}/no-lm", "--out", "{tmp}/b"], "not a local folder"),
        (["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", "{data}", "--out", "{tmp}/x/y/b"], "does not exist"),
        (["export", "--bank", "{tmp}/none", "--history", "{history}", "--out", "{tmp}/x"], "not a pmeta bank"),
        (["adapt", "--bank", "{bank}", "--history", "{history}", "--input", "x", "--device", "cuda"], "text banks run on the CPU only"),
        (["adapt", "--bank", "{tmp}/none", "--history", "{history}", "--input", "x"], "not a pmeta bank"),
        (["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", "{data}", "--device", "cuda:0", "--out", "{tmp}/b"], "text banks run on the CPU only"),
    ],
)
def test_cli_errors(setup, tmp_path, args, message):
    history = tmp_path / "h.json"
    history.write_text(json.dumps(_profile(setup["data"])[1]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"user_id": "u", "profile": [{"id": "1", "text": "t", "score": "7"}]}))
    values = {"bank": setup["bank"], "history": history, "bad": bad, "missing": tmp_path / "missing.json", "data": setup["data"], "tmp": tmp_path}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pmeta: error:") and message in lines[0], result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "x").exists()  # a refused build creates no bank


def test_prompt_budget_and_template():
    from pmeta.text.prompts import RETRIEVED_HEADER, PromptBuilder, input_prefix, support_pair
    from pmeta.data.lamp import task_spec

    assert input_prefix("LaMP-3", [f"{RATING_PREFIX} fine strings", f"{RATING_PREFIX} bad"]) == RATING_PREFIX
    assert input_prefix("LaMP-4", ["Generate a title for the following product review: nice"]) == "Generate a title for the following product review:"
    pair = support_pair(task_spec("LaMP-3"), {"id": "1", "text": "x " * 200, "score": "4"}, RATING_PREFIX, 40, 20)
    assert pair.input.startswith(RATING_PREFIX) and len(pair.input) <= len(RATING_PREFIX) + 41 and pair.output == "4" and pair.kind == "options"
    items = [{"id": str(i), "text": f"review number {i} " * 30, "score": "5"} for i in range(3)]
    roomy = PromptBuilder("LaMP-3", max_tokens=400, item_chars=60)
    text = roomy.text(f"{RATING_PREFIX} short one", items)
    assert text.startswith(RETRIEVED_HEADER) and text.count("\n- ") == 3 and text.endswith("short one")
    assert all(len(line) <= 2 + 60 for line in text.splitlines()[1:4])  # each item cut to item_chars
    assert roomy.text_and_items(f"{RATING_PREFIX} short one", items) == (text, 3)
    middle = PromptBuilder("LaMP-3", max_tokens=roomy.count(text) - 5, item_chars=60)
    assert middle.text_and_items(f"{RATING_PREFIX} short one", items)[1] == 2  # the least relevant item dropped, and counted
    tight = PromptBuilder("LaMP-3", max_tokens=60, item_chars=60)
    text = tight.text(f"{RATING_PREFIX} " + "a very long review " * 100, items)
    assert text.startswith(RATING_PREFIX) and tight.count(text) <= 60  # items dropped, review cut, instruction kept
    assert tight.text_and_items(f"{RATING_PREFIX} " + "a very long review " * 100, items) == (text, 0)


def test_training_questions_carry_retrieval(setup, opened):
    """Meta-training and validation questions carry the BM25 items pmeta+retrieval serves with."""
    from pmeta.data.lamp import load_split, truncate_profile
    from pmeta.text.build import query_with_retrieval
    from pmeta.text.prompts import RETRIEVED_HEADER

    model = opened.model
    example = load_split(setup["data"], "LaMP-3", "train")[0]
    pair = query_with_retrieval(model, example)
    recent = truncate_profile(example.profile, model.config.support_max)
    assert len(pair.retrieved) == min(model.config.retrieve, len(recent)) > 0
    assert all(item in recent for item in pair.retrieved)
    assert list(pair.retrieved) == model.retrieved(pair.input, recent, model.config.retrieve)  # the serving ranking
    budget = model.prompts.max_tokens
    try:
        model.prompts.max_tokens = 4096  # the tiny preset's 96-token budget leaves no room for items
        assert RETRIEVED_HEADER in model.pair_prompt(pair) and RETRIEVED_HEADER not in model.pair_prompt(replace(pair, retrieved=()))
    finally:
        model.prompts.max_tokens = budget
    plain = model.config
    try:
        model.config = plain.model_copy(update={"train_with_retrieval": False})
        assert query_with_retrieval(model, example).retrieved == ()
    finally:
        model.config = plain


def test_label_prior(setup, opened, tmp_path):
    """The closed-form label prior moves the average prediction to the train label frequencies; the
    baselines score without it; exports record it."""
    from pmeta.data.lamp import LampExample, load_split
    from pmeta.text.build import label_prior, query_with_retrieval

    model = opened.model
    bias = model.t.label_bias
    assert bias is not None and bias.shape == (len(model.labels),) and torch.isfinite(bias).all()
    train = load_split(setup["data"], "LaMP-3", "train")
    skewed = [LampExample(e.id, e.input, e.profile, "2") for e in train]  # every train user rates "2"
    saved = model.t.label_bias
    try:
        model.t.label_bias = label_prior(model, skewed)
        prompts = [model.pair_prompt(query_with_retrieval(model, e)) for e in skewed]
        personal = {k: v.unsqueeze(0).expand(len(prompts), *v.shape) for k, v in model.t.global_adapter.items()}
        with torch.no_grad():
            mean = torch.softmax(model.option_scores(prompts, personal), -1).mean(0)
            raw = torch.softmax(model.option_scores(prompts, personal, prior=False), -1).mean(0)
        assert model.labels[int(mean.argmax())] == "2" and mean.max() > 0.5 > raw[model.labels.index("2")]
        bare = [model.labels[int(i)] for i in model.lm.option_logprobs(prompts, model.labels, None).argmax(-1)]
        assert model.predict(prompts, None, decode="argmax", prior=False) == bare
    finally:
        model.t.label_bias = saved
    _, history = _profile(setup["data"])
    out = opened.personalize(history).export_peft(tmp_path / "adapter")
    recorded = json.loads((out / "pmeta_export.json").read_text())["label_prior"]
    assert list(recorded) == model.labels and recorded["5"] == pytest.approx(float(bias[model.labels.index("5")]), abs=1e-5)


def test_a_history_of_the_other_kind_of_bank_says_so():
    from pmeta.data.history import parse_history
    from pmeta.text.history import parse_text_history

    with pytest.raises(InvalidHistory, match=r"this is a ranking bank's history \("):
        parse_text_history({"user_id": "u", "items": [{"item_id": "1"}]}, "LaMP-3")
    with pytest.raises(InvalidHistory, match=r"this is a text bank's history \("):
        parse_history({"user_id": "u", "profile": [{"id": "1", "text": "t", "score": "4"}]})
    # a user id pydantic refuses reads as our own clause, without pydantic's "Value error, " prefix
    with pytest.raises(InvalidHistory) as info:
        parse_text_history({"user_id": "a/b", "profile": []}, "LaMP-3", "--user")
    assert str(info.value).startswith("--user: user_id: ") and "Value error" not in str(info.value)


def test_the_shipped_example_profile_is_a_valid_lamp3_history():
    from pathlib import Path

    from pmeta.text.history import load_text_history

    history, items = load_text_history(Path(__file__).resolve().parents[1] / "examples" / "profile.json", "LaMP-3")
    assert history.user_id == "u1" and [item["id"] for item in items] == ["r1", "r2", "r3"]

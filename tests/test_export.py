"""PEFT export: a pmeta adapter written as a PEFT LoRA directory gives the same logits under PeftModel."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_causal_lm import random_adapters, smollm2, texts, tiny_llama_dir, tiny_lm  # noqa: F401  (fixtures)

from pmeta.errors import InvalidRequest
from pmeta.export import export_peft, splice_soft_prompt
from pmeta.models.personal import stack


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread_export():
    """1 torch thread, as in test_causal_lm.py (much faster on a busy shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_user(personal: dict) -> dict:
    return {k: v[0] for k, v in personal.items()}


def peft_model(base_dir, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    return PeftModel.from_pretrained(base, out).eval()


def check_round_trip(lm, base_dir, adapter: dict, out, prompts: list[str]) -> None:
    """PEFT logits == pmeta logits, without and with the soft prompt (spliced in through inputs_embeds)."""
    model = peft_model(base_dir, out)
    soft = load_file(out / "soft_prompt.safetensors")["prompt"]
    assert torch.equal(soft, adapter["prompt"].float())
    batched = {k: v[None] for k, v in adapter.items()}
    lora_only = {k: v for k, v in batched.items() if k != "prompt"}
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor(lm._encode_prompts([text]))
            mask = torch.ones_like(ids)
            plain = model(input_ids=ids).logits
            assert torch.allclose(plain, lm.logits(ids, mask, lora_only), atol=1e-4)
            embeds = splice_soft_prompt(model.get_input_embeddings()(ids), ids, soft, lm.bos_id)
            with_prompt = model(inputs_embeds=embeds).logits
            at = 1 if int(ids[0, 0]) == lm.bos_id else 0
            keep = [i for i in range(embeds.shape[1]) if not at <= i < at + soft.shape[0]]
            assert torch.allclose(with_prompt[:, keep], lm.logits(ids, mask, batched), atol=1e-4)


def test_export_round_trip_tiny(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    # a fused (rank 2) + stacked (rank 1) adapter: total rank 3, as pmeta serves it
    adapter = one_user(stack(random_adapters(tiny_lm, 1, rank=2, seed=7), random_adapters(tiny_lm, 1, rank=1, seed=8)))
    out = export_peft(tiny_lm, adapter, tmp_path / "export", str(tiny_llama_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 3
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tiny_llama_dir)
    weights = load_file(out / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 32)
    assert weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 3)
    assert len(weights) == 8 and (out / "README.md").is_file()
    check_round_trip(tiny_lm, tiny_llama_dir, adapter, out, [texts(tiny_lm)[0], "the lazy dog"])
    # exporting again replaces the previous export atomically; an unrelated folder is refused
    adapter2 = one_user(random_adapters(tiny_lm, 1, rank=1, seed=9))
    export_peft(tiny_lm, adapter2, out, str(tiny_llama_dir))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidRequest):
        export_peft(tiny_lm, adapter2, tmp_path / "other", str(tiny_llama_dir))
    with pytest.raises(InvalidRequest):
        export_peft(tiny_lm, {"prompt": adapter2["prompt"]}, tmp_path / "none", str(tiny_llama_dir))
    with pytest.raises(InvalidRequest):
        export_peft(tiny_lm, {k: v[None] for k, v in adapter2.items()}, tmp_path / "batched", str(tiny_llama_dir))


def test_export_subset_and_mixed_ranks(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    """Only some layers carry LoRA, with different ranks: exact module names and rank/alpha patterns."""
    adapter = one_user(random_adapters(tiny_lm, 1, rank=2, seed=10))
    for key in ("layers.0.q_proj.A", "layers.0.q_proj.B"):
        del adapter[key]
    adapter["layers.1.v_proj.A"] = adapter["layers.1.v_proj.A"][:1]
    adapter["layers.1.v_proj.B"] = adapter["layers.1.v_proj.B"][:, :1]
    out = export_peft(tiny_lm, adapter, tmp_path / "subset", str(tiny_llama_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"] and len(config["target_modules"]) == 3
    check_round_trip(tiny_lm, tiny_llama_dir, adapter, out, [texts(tiny_lm)[2]])


def test_export_round_trip_smollm2(smollm2, tmp_path):  # noqa: F811
    start = time.perf_counter()
    lm = smollm2
    adapter = one_user(stack(
        random_adapters(lm, 1, rank=2, prompt_length=4, seed=11), random_adapters(lm, 1, rank=1, prompt_length=4, seed=12)
    ))
    for key in adapter:  # keep the change moderate on a real model
        if key.endswith(".B"):
            adapter[key] = adapter[key] * 0.05
    out = export_peft(lm, adapter, tmp_path / "smol", str(lm.path))
    check_round_trip(lm, lm.path, adapter, out, [lm.format_prompt("Give a title to: great strings, bright tone.")])
    print(f"\nSmolLM2 export round trip: {time.perf_counter() - start:.1f}s")


def test_a_folder_with_files_an_export_does_not_write_is_refused_and_kept(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    """A folder that merely holds a ``pmeta_export.json`` (an adapter's files copied into a project),
    or an earlier export the user added files to, is not replaced: nothing in it is deleted."""
    adapter = one_user(random_adapters(tiny_lm, 1, rank=1, seed=13))
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "thesis.tex").write_text("months of work")
    (project / "src" / "code.py").write_text("print(1)")
    (project / "pmeta_export.json").write_text("{}")
    with pytest.raises(InvalidRequest, match=r"holds src, thesis.tex, which a pmeta export does not write"):
        export_peft(tiny_lm, adapter, project, str(tiny_llama_dir))
    assert sorted(p.name for p in project.rglob("*")) == ["code.py", "pmeta_export.json", "src", "thesis.tex"]
    out = export_peft(tiny_lm, adapter, tmp_path / "adapter", str(tiny_llama_dir))
    (out / "notes.md").write_text("mine")
    with pytest.raises(InvalidRequest, match="holds notes.md"):
        export_peft(tiny_lm, adapter, out, str(tiny_llama_dir))
    assert (out / "notes.md").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


def test_a_failed_final_rename_puts_the_previous_export_back(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    """The two-rename swap, used where the atomic exchange is not (another system, an old glibc)."""
    import errno
    import os

    import pmeta.export

    monkeypatch.setattr(pmeta.export, "_renameat2", lambda: None, raising=False)
    first = export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=1, seed=14)), tmp_path / "adapter", str(tiny_llama_dir))
    before = (first / "adapter_model.safetensors").read_bytes()
    real = os.rename

    def busy(src, dst):
        if ".tmp-" in str(src):  # the finished export's rename into place
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(pmeta.export.os, "rename", busy)
    with pytest.raises(OSError, match="busy"):
        export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=2, seed=15)), first, str(tiny_llama_dir))
    assert (first / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # nothing stranded beside it


def test_concurrent_exports_to_one_folder_each_land_whole(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    import threading

    adapters = [one_user(random_adapters(tiny_lm, 1, rank=r, seed=20 + r)) for r in (1, 2, 3, 4)]
    errors, barrier = [], threading.Barrier(4)

    def work(adapter):
        barrier.wait()
        try:
            for _ in range(4):
                export_peft(tiny_lm, adapter, tmp_path / "shared", str(tiny_llama_dir))
        except Exception as error:  # noqa: BLE001 - the test reports any
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(a,)) for a in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    rank = json.loads((tmp_path / "shared" / "adapter_config.json").read_text())["r"]
    weights = load_file(tmp_path / "shared" / "adapter_model.safetensors")
    assert rank in (1, 2, 3, 4) and weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == rank


def test_bad_targets_and_values_are_typed_errors(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    adapter = one_user(random_adapters(tiny_lm, 1, rank=1, seed=16))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for target in (".", "", str(tmp_path)):
        with pytest.raises(InvalidRequest, match="the current directory or holds it"):
            export_peft(tiny_lm, adapter, target, str(tiny_llama_dir))
    nan = dict(adapter)
    nan["layers.0.q_proj.B"] = torch.full_like(nan["layers.0.q_proj.B"], float("nan"))
    with pytest.raises(InvalidRequest, match=r"adapter\['layers.0.q_proj.B'\] holds NaN"):
        export_peft(tiny_lm, nan, tmp_path / "nan", str(tiny_llama_dir))
    for base in (None, ""):
        with pytest.raises(InvalidRequest, match="base_model_name_or_path must be a non-empty string"):
            export_peft(tiny_lm, adapter, tmp_path / "nobase", base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_the_soft_prompt_metadata_says_start_for_an_lm_without_bos(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    from safetensors import safe_open

    monkeypatch.setattr(tiny_lm, "bos_id", None)
    out = export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=1, seed=17)), tmp_path / "nobos", str(tiny_llama_dir))
    with safe_open(str(out / "soft_prompt.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["insert"] == "start" and "bos_token_id" not in metadata
    assert json.loads((out / "pmeta_export.json").read_text())["soft_prompt_insert"] == "start"


def test_a_link_to_an_export_replaces_the_export_it_points_to(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    real = export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=1, seed=18)), tmp_path / "real", str(tiny_llama_dir))
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=2, seed=19)), tmp_path / "link", str(tiny_llama_dir))
    assert (tmp_path / "link").is_symlink() and json.loads((real / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def export_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Killed(BaseException):
    """The process killed at this point: no ``except OSError`` recovery runs."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic exchange (renameat2) is Linux's")
def test_a_replacement_killed_after_its_first_step_leaves_a_whole_export(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    """Killed right after the swap's first step, ``out`` still holds an export, the old or the new one,
    whole (the exchange has one step; the two-rename swap left no ``out`` between its renames)."""
    import os

    import pmeta.export

    old_adapter, new_adapter = (one_user(random_adapters(tiny_lm, 1, rank=r, seed=30 + r)) for r in (1, 2))
    (tmp_path / "live").mkdir()
    (tmp_path / "ref").mkdir()
    out = export_peft(tiny_lm, old_adapter, tmp_path / "live" / "adapter", str(tiny_llama_dir))
    old = export_files(out)
    new = export_files(export_peft(tiny_lm, new_adapter, tmp_path / "ref" / "adapter", str(tiny_llama_dir)))  # the same bytes under the same name
    assert old != new
    real_rename, real_exchange = os.rename, getattr(pmeta.export, "_exchange", None)

    def rename(src, dst):
        real_rename(src, dst)
        raise Killed

    def exchange(a, b):
        if not real_exchange(a, b):
            pytest.skip("this file system has no RENAME_EXCHANGE")
        raise Killed

    monkeypatch.setattr(pmeta.export.os, "rename", rename)
    monkeypatch.setattr(pmeta.export, "_exchange", exchange, raising=False)
    with pytest.raises(Killed):
        export_peft(tiny_lm, new_adapter, out, str(tiny_llama_dir))
    monkeypatch.undo()
    assert out.is_dir() and export_files(out) in (old, new)


@pytest.mark.parametrize("system", ["no renameat2", "EINVAL"])
def test_the_two_rename_swap_replaces_an_export_where_there_is_no_exchange(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch, system):  # noqa: F811
    """No ``renameat2`` (another system, glibc < 2.28), or a file system that answers EINVAL: the
    previous export is still replaced, and nothing is left beside it."""
    import ctypes
    import errno

    import pmeta.export

    calls = []

    def einval(*args):
        calls.append(args)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(pmeta.export, "_renameat2", (lambda: None) if system == "no renameat2" else (lambda: einval), raising=False)
    out = export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=1, seed=40)), tmp_path / "adapter", str(tiny_llama_dir))
    export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=3, seed=41)), out, str(tiny_llama_dir))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert len(calls) == (system == "EINVAL")  # the first export is a plain rename


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic exchange (renameat2) is Linux's")
def test_a_failed_exchange_keeps_the_previous_export_and_the_folders_are_synced(tiny_lm, tiny_llama_dir, tmp_path, monkeypatch):  # noqa: F811
    """An exchange that fails for a real reason changes nothing and raises; one that succeeds is followed
    by an fsync of the new folder and of its parent (the renamed entries are durable)."""
    import ctypes
    import errno
    import os

    import pmeta.export

    out = export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=1, seed=42)), tmp_path / "adapter", str(tiny_llama_dir))
    before = export_files(out)

    def busy(*args):
        ctypes.set_errno(errno.EBUSY)
        return -1

    monkeypatch.setattr(pmeta.export, "_renameat2", lambda: busy)
    with pytest.raises(OSError, match="busy"):
        export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=2, seed=43)), out, str(tiny_llama_dir))
    assert export_files(out) == before and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    monkeypatch.undo()
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(pmeta.export.os, "fsync", fsync)
    export_peft(tiny_lm, one_user(random_adapters(tiny_lm, 1, rank=2, seed=43)), out, str(tiny_llama_dir))
    monkeypatch.undo()
    assert str(tmp_path.resolve()) == synced[-1]  # the parent, after the exchange
    assert any(".adapter.tmp-" in path and path.rsplit("/", 1)[1].startswith(".adapter.tmp-") for path in synced)  # the new folder itself
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 and [p.name for p in tmp_path.iterdir()] == ["adapter"]


EXPORT_SCRIPT = """
import sys

import torch

torch.set_num_threads(1)
from pmeta.export import export_peft
from pmeta.models.causal_lm import CausalLM

from safetensors.torch import load_file

lm = CausalLM(sys.argv[1])
adapters = {}
for key, tensor in load_file(sys.argv[2]).items():  # "name/tensor key"
    name, _, tensor_key = key.partition("/")
    adapters.setdefault(name, {})[tensor_key] = tensor
for name, adapter in adapters.items():
    export_peft(lm, adapter, f"{sys.argv[3]}/{name}", "base-model")
"""


def test_exports_are_byte_for_byte_reproducible_across_hash_seeds(tiny_lm, tiny_llama_dir, tmp_path):  # noqa: F811
    """PEFT keeps ``target_modules`` as a set and safetensors its metadata in a hash map: the same
    adapter, exported by processes with different PYTHONHASHSEED values, still gives the same bytes
    in every file (README.md too), and the canonical safetensors headers load as written."""
    import os
    import subprocess

    from safetensors import safe_open

    full = one_user(random_adapters(tiny_lm, 1, rank=2, seed=44))
    subset = {k: v for k, v in full.items() if not k.startswith("layers.0.q_proj")}
    subset["layers.1.v_proj.A"], subset["layers.1.v_proj.B"] = subset["layers.1.v_proj.A"][:1], subset["layers.1.v_proj.B"][:, :1]
    from safetensors.torch import save_file

    save_file({f"{name}/{key}": tensor.clone().contiguous() for name, adapter in (("full", full), ("subset", subset)) for key, tensor in adapter.items()}, tmp_path / "adapters.safetensors")
    files = {}
    for seed in ("1", "3"):  # two seeds that order {"q_proj", "v_proj"} differently
        (tmp_path / seed).mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(tiny_llama_dir), str(tmp_path / "adapters.safetensors"), str(tmp_path / seed)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        files[seed] = {name: export_files(tmp_path / seed / name) for name in ("full", "subset")}
    assert files["1"] == files["3"]
    assert "README.md" in files["1"]["full"] and "soft_prompt.safetensors" in files["1"]["full"]
    out = tmp_path / "1" / "full"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and list(config) == sorted(config)
    assert json.loads((tmp_path / "1" / "subset" / "adapter_config.json").read_text())["target_modules"] == sorted(
        ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    assert torch.equal(load_file(out / "soft_prompt.safetensors")["prompt"], full["prompt"].float())
    with safe_open(str(out / "soft_prompt.safetensors"), "pt") as handle:
        assert handle.metadata() == {"insert": "after_bos", "bos_token_id": str(tiny_lm.bos_id)}
    weights = load_file(out / "adapter_model.safetensors")
    assert torch.equal(weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], full["layers.1.v_proj.B"])
    for name in ("soft_prompt.safetensors", "adapter_model.safetensors"):
        data = (out / name).read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + size]
        assert size % 8 == 0 and header.rstrip(b" ") == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def promptless_bank(tmp_path_factory):
    """A tiny LaMP-3 text bank built with ``prompt_length = 0`` (LoRA only, no soft prompt)."""
    from pmeta.fuzz.lamp_tiny import tiny_llama, write_lamp
    from typer.testing import CliRunner

    from pmeta.cli import app
    from pmeta.text.bank import TextBank

    root = tmp_path_factory.mktemp("promptless")
    lm_dir, data = tiny_llama(root / "llama"), write_lamp(root / "lamp3")
    (root / "config.toml").write_text("prompt_length = 0\n")
    result = CliRunner().invoke(app, ["bank", "build", "--format", "lamp", "--task", "LaMP-3", "--data", str(data), "--preset", "tiny",
                                      "--config", str(root / "config.toml"), "--lm", str(lm_dir), "--out", str(root / "bank"), "--quiet"])
    assert result.exit_code == 0, result.output
    return TextBank.open(root / "bank"), data


@pytest.mark.parametrize("decode", ["argmax", "expected"])
def test_an_export_without_a_soft_prompt_documents_and_reproduces_the_prediction(promptless_bank, tmp_path, monkeypatch, decode, readme_prediction):
    """With ``prompt_length = 0`` the README still has "Predictions as pmeta makes them", worded
    without the soft prompt, and its code, run as written, gives pmeta's prediction."""
    bank, data = promptless_bank
    monkeypatch.setattr(bank.model, "config", bank.model.config.model_copy(update={"rating_decode": decode}))
    question = json.loads((data / "test_questions.json").read_text())[0]
    p = bank.personalize({"user_id": "u-1", "profile": question["profile"]})
    assert p.adapter["prompt"].shape[0] == 0
    out = p.export_peft(tmp_path / "adapter")
    assert not (out / "soft_prompt.safetensors").exists()
    readme = (out / "README.md").read_text()
    assert "## Predictions as pmeta makes them (task LaMP-3)" in readme and "this export has no soft prompt" in readme
    assert "soft_prompt" not in readme and "inputs_embeds" not in readme
    blocks, scope = readme_prediction(readme, p.prompt(question["input"]), tmp_path)
    assert len(blocks) == 2 and f"# decode: {decode}" in blocks[1]
    ours = p.predict(question["input"])
    if decode == "argmax":
        assert scope["prediction"] == ours
    else:
        assert float(scope["prediction"]) == pytest.approx(float(ours), abs=1.1e-3)


def test_the_greedy_prediction_rule_mentions_the_soft_prompt_only_when_there_is_one():
    from pmeta.export import prediction_readme

    prediction = {"task": "LaMP-5", "kind": "generation", "labels": None, "decode": "greedy", "max_new_tokens": 24, "retrieve": 2, "max_length": 512}
    assert "spliced in" in prediction_readme(prediction, "adapter", "0", soft_prompt=True)
    plain = prediction_readme(prediction, "adapter", "0", soft_prompt=False)
    assert "Greedy decoding" in plain and "at most 24 new tokens" in plain and "soft prompt `prompt`" not in plain and "spliced" not in plain

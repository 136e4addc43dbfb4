"""PEFT export: a pmeta adapter written as a PEFT LoRA directory gives the same logits under PeftModel."""

from __future__ import annotations

import json
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
    import errno
    import os

    import pmeta.export

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

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

"""Settings of a text bank (LaMP-format tasks on a causal LM): one validated pydantic model and presets.

The resolved settings are stored in every text bank version (with ``"kind": "text"``), so a bank can
be rebuilt exactly and a reader knows which backbone and task it serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import DEFAULT_ENCODER, MAX_INNER_STEPS, MAX_SEED, resolve_config

DEFAULT_LM = "bundled:SmolLM2-135M-Instruct"


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["text"] = "text"
    task: str = Field("LaMP-3", description="LaMP task name (LaMP-1, 2, 3, 4, 5 or 7).")
    lm: str = Field(DEFAULT_LM, description="Causal LM backbone: 'bundled:SmolLM2-135M-Instruct', a local path or a cached HF id.")
    encoder: str = Field(DEFAULT_ENCODER, description="Sentence encoder of the user keys (mean embedding of profile texts).")
    lora_targets: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="Projections of the LM that carry LoRA.")
    lora_layers: int = Field(8, ge=0, description="LoRA only in the top N layers (0 = every layer): the inner steps then back-propagate through N layers only.")
    prompt_length: int = Field(4, ge=0, le=64, description="Soft prompt length of the global prior and the anchors (0 = LoRA only); meta-trained, not tuned by the inner steps.")
    anchor_rank: int = Field(2, ge=1, le=16)
    stack_rank: int = Field(1, ge=1, le=16)
    anchors: int = Field(4, ge=1, le=10_000)
    top_k: int = Field(2, ge=1, description="Anchors fused per user.")
    temperature: float = Field(0.05, gt=0, description="Initial fusion temperature (learned).")

    meta: Literal["maml", "fomaml", "reptile"] = "fomaml"
    inner_steps: int = Field(3, ge=0, le=MAX_INNER_STEPS)
    inner_lr: float = Field(0.05, gt=0, description="Initial inner step size (learned per tensor with maml).")
    max_inner_lr_factor: float = Field(64.0, ge=1, description="Largest multiple of inner_lr the validation search tries.")
    support_min: int = Field(1, ge=1)
    support_max: int = Field(5, ge=1, description="Most recent profile items used as support at serving time.")
    train_support_max: int = Field(3, ge=1, description="Largest support set of a meta-training episode (cost).")
    query_items: int = Field(1, ge=0, description="Held-out profile items added to the train user's own example as query.")
    meta_batch_users: int = Field(4, ge=1)
    global_steps: int = Field(20, ge=0)
    anchor_steps: int = Field(10, ge=0)
    stack_steps: int = Field(10, ge=0)
    outer_lr: float = Field(3e-3, gt=0)
    validation_users: int = Field(16, ge=0, description="Dev users for early stopping and the choice of the rating decoder.")
    validate_every: int = Field(5, ge=1)
    early_stopping: bool = True
    max_train_users: int = Field(2000, ge=1, description="At most this many train users are used (seeded choice).")

    max_prompt_tokens: int = Field(384, ge=32, le=4096, description="Token budget of a query prompt (input + retrieved profile items).")
    item_chars: int = Field(240, ge=16, description="A retrieved profile item is cut to this many characters.")
    support_chars: int = Field(240, ge=16, description="The text of a support example is cut to this many characters.")
    target_chars: int = Field(120, ge=8, description="Generation targets are cut to this many characters.")
    retrieve: int = Field(4, ge=0, le=16, description="BM25 profile items in the prompt of pmeta+retrieval (and --retrieve default); meta-training uses the same number.")
    max_new_tokens: int = Field(24, ge=1, le=256)
    train_with_retrieval: bool = Field(True, description="Meta-training and validation questions carry the `retrieve` best BM25 items of the user's recent profile in their prompt, as pmeta+retrieval serves (the bank learns to use retrieval).")
    label_prior: bool = Field(True, description="Classification and rating tasks: a learned per-label offset on the LM's label scores, initialised in closed form from the train label frequencies (contextual calibration) and meta-trained.")
    label_prior_lr: float = Field(0.05, gt=0, description="Outer learning rate of the label prior.")
    rating_decode: Literal["argmax", "expected"] = Field("argmax", description="Rating prediction: most likely label or expected value (chosen on dev users at build).")
    input_prefix: str = Field("", description="The task's input template before the free text (learned from the train inputs at build).")
    lora_baseline_rank: int = Field(4, ge=1, le=64, description="Rank of the per-user LoRA baseline (OPPU recipe).")
    lora_baseline_steps: int = Field(5, ge=1, description="Adam steps of the per-user LoRA baseline.")
    lora_baseline_lr: float = Field(5e-3, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "cpu"

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.support_max < self.support_min:
            raise ValueError("support_max must be >= support_min")
        return self


TEXT_PRESETS: dict[str, dict] = {
    # seconds with a tiny random Llama: tests
    "tiny": dict(lora_layers=0, anchors=2, top_k=2, prompt_length=2, global_steps=2, anchor_steps=2, stack_steps=2, meta_batch_users=2,
                 validation_users=2, lora_baseline_steps=2, validate_every=2, max_prompt_tokens=96, item_chars=80, support_chars=80, target_chars=40,
                 max_new_tokens=6, support_max=3, inner_steps=2, train_support_max=2),
    # SmolLM2 on 2 CPU cores: a few minutes
    "small": dict(anchors=4, top_k=2, prompt_length=2, lora_layers=4, global_steps=6, anchor_steps=4, stack_steps=4, meta_batch_users=2,
                  validation_users=4, validate_every=4, support_max=5, train_support_max=2, max_train_users=200, max_prompt_tokens=256,
                  item_chars=160, support_chars=120, target_chars=80, max_new_tokens=16, inner_steps=3, lora_baseline_steps=4),
    "default": {},
}


def load_text_config(preset: str = "default", file: str | Path | None = None, overrides: dict | None = None) -> TextConfig:
    """Preset, then a TOML file's keys (top level or a [bank] table), then explicit overrides (None = unset)."""
    return resolve_config(TextConfig, TEXT_PRESETS, preset, file, overrides)

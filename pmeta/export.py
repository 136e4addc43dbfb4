"""Export one user's personal parameters as a standard PEFT LoRA adapter directory.

``export_peft(lm, adapter, out_dir, base)`` writes

* ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type`` LORA, ``r`` = the adapter's total
  rank, ``lora_alpha = r`` so PEFT's scaling α/r is 1, exactly pmeta's ``W₀ + B A``);
* ``adapter_model.safetensors``: ``lora_A`` / ``lora_B`` weights under PEFT's key names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ...), so
  ``PeftModel.from_pretrained(base, out_dir)`` (and vLLM / LoRAX) load it as is;
* ``soft_prompt.safetensors`` (``prompt``: (l, d)): PEFT cannot stack a prompt with LoRA, so the
  prompt is written beside it; :func:`splice_soft_prompt` (or the directory's README.md) shows how
  to feed it through ``inputs_embeds``;
* ``pmeta_export.json`` and ``README.md``.

The directory appears atomically (written to a temporary sibling, fsynced, then renamed); an
existing export at ``out_dir`` (a folder holding only an export's own files) is replaced, any other
non-empty directory is refused. On Linux the replacement is one atomic exchange (``renameat2`` with
``RENAME_EXCHANGE``): at every moment ``out_dir`` holds the old or the new export, whole, even if
the process is killed. Where that is unavailable (another system, an old glibc or kernel, a file
system without it) the previous export is moved aside first, and a failed final rename puts it
back. Concurrent exports to one folder each land whole, the last one wins.

The files are byte-for-byte reproducible: the same adapter gives the same bytes in every process
(``adapter_config.json`` with sorted keys and ``target_modules``, safetensors headers in a
canonical order), whatever ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import re
import shutil
import stat
import struct
import sys
import uuid
from pathlib import Path

import torch

from .checks import as_path, is_path_error, os_error_message
from .errors import InvalidRequest
from .models.causal_lm import CausalLM
from .storage.tensor_file import save_tensors

MARKER = "pmeta_export.json"
#: The files an export writes: a folder holding only these (and the marker) is a previous export.
EXPORT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "soft_prompt.safetensors", MARKER, "README.md"})

README = """# pmeta personalization, exported as a PEFT LoRA adapter

Base model: `{base}`. LoRA rank {rank} on {targets} (scaling 1: `lora_alpha = r`).
The adapter was fitted to exactly these base weights: for pmeta's bundled SmolLM2 that is the
de-quantized Q4_1 GGUF in pmeta's model cache, not the original Hugging Face checkpoint.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{dirname}")       # the LoRA part
tokenizer = AutoTokenizer.from_pretrained("{base}")
```
"""

README_PROMPT = """
## Soft prompt ({length} vectors of size {hidden}), `soft_prompt.safetensors`

PEFT cannot stack a soft prompt with LoRA, so it is stored beside the adapter. pmeta inserts it into
the input embeddings **{where}**, and lets position ids run over it like over real tokens:

```python
import torch
from safetensors.torch import load_file

prompt = load_file("{dirname}/soft_prompt.safetensors")["prompt"]           # ({length}, {hidden})
# text: the chat-formatted prompt; pmeta adds the tokenizer's special tokens unless text starts with the BOS
ids = tokenizer(text, return_tensors="pt", add_special_tokens=not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))).input_ids
embeds = model.get_input_embeddings()(ids)
at = {at_rule}
embeds = torch.cat([embeds[:, :at], prompt[None].to(embeds.dtype), embeds[:, at:]], dim=1)
out = model(inputs_embeds=embeds)                       # or model.generate(inputs_embeds=embeds, ...)
```

(`pmeta.export.splice_soft_prompt` does the same for a batch.) Without the soft prompt the LoRA alone
still applies the user's adaptation, but outputs then differ from pmeta's.
"""


README_PREDICT = """
## Predictions as pmeta makes them (task {task})

pmeta's prompt for an input is `TextPersonalization.prompt(input)`: the task's instruction, the
{retrieve} best BM25 items of the user's own profile (`prediction.retrieve` in `pmeta_export.json`;
0: none) and the input, in the LM's chat format; a prompt longer than {max_length} tokens keeps its
BOS and its last tokens. With `text` that prompt, and {loaded} loaded as above:

{rule}
"""

RULE_OPTIONS = """```python
import json

import torch

meta = json.load(open("{dirname}/pmeta_export.json"))
labels, label_prior = meta["prediction"]["labels"], meta.get("label_prior", {{}})
bos = tokenizer.bos_token
prompt_ids = tokenizer(text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))).input_ids


def score(label):  # log p(label | prompt), summed over the label's tokens
    label_ids = tokenizer(label, add_special_tokens=False).input_ids
    ids = torch.cat([prompt_ids, torch.tensor([label_ids])], dim=1)
{forward}
    return logp[torch.arange(len(label_ids)), label_ids].sum()


scores = torch.stack([score(label) for label in labels]) + torch.tensor([label_prior.get(label, 0.0) for label in labels])
{decode}
```"""

DECODE_ARGMAX = "prediction = labels[int(scores.argmax())]  # decode: argmax"
DECODE_EXPECTED = ('prediction = f"{float(torch.softmax(scores, 0) @ torch.tensor([float(label) for label in labels])):.3f}"'
                   "  # decode: expected (the expected rating)")
FORWARD_PROMPT = """    embeds = model.get_input_embeddings()(ids)
    at = {at_rule}
    embeds = torch.cat([embeds[:, :at], prompt[None].to(embeds.dtype), embeds[:, at:]], dim=1)
    start = prompt_ids.shape[1] - 1 + prompt.shape[0]  # the soft prompt shifts every position by its length
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0, start : start + len(label_ids)], -1)"""
FORWARD_PLAIN = """    start = prompt_ids.shape[1] - 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, start : start + len(label_ids)], -1)"""
RULE_GENERATE = ("Greedy decoding (`prediction.decode`: greedy) of at most {max_new_tokens} new tokens "
                 "(`prediction.max_new_tokens`){spliced}, stopping at the "
                 "tokenizer's EOS; the text is stripped of surrounding white space.")


def prediction_readme(prediction: dict, dirname: str, at_rule: str, soft_prompt: bool = True) -> str:
    """The export README's section on how pmeta turns the adapted LM into a prediction (tests run its
    code); without a soft prompt (``prompt_length`` 0) the LM reads the token ids as they are."""
    if prediction["decode"] == "greedy":
        rule = RULE_GENERATE.format(max_new_tokens=prediction["max_new_tokens"], spliced=", with the soft prompt spliced in as above" if soft_prompt else "")
    else:
        forward = FORWARD_PROMPT.format(at_rule=at_rule) if soft_prompt else FORWARD_PLAIN
        rule = RULE_OPTIONS.format(dirname=dirname, forward=forward, decode=DECODE_EXPECTED if prediction["decode"] == "expected" else DECODE_ARGMAX)
    loaded = "`model`, `tokenizer` and the soft prompt `prompt`" if soft_prompt else "`model` and `tokenizer` (this export has no soft prompt)"
    return README_PREDICT.format(task=prediction["task"], retrieve=prediction["retrieve"], max_length=prediction["max_length"], loaded=loaded, rule=rule)


def splice_soft_prompt(
    embeds: torch.Tensor, input_ids: torch.Tensor, prompt: torch.Tensor, bos_token_id: int | None, after_bos: bool = True
) -> torch.Tensor:
    """Insert ``prompt`` (l, d) into unpadded ``embeds`` (n, T, d) as pmeta does: after a leading BOS, else first."""
    rows = []
    for i in range(embeds.shape[0]):
        at = 1 if after_bos and bos_token_id is not None and int(input_ids[i, 0]) == bos_token_id else 0
        rows.append(torch.cat([embeds[i, :at], prompt.to(embeds.dtype), embeds[i, at:]]))
    return torch.stack(rows)


def export_peft(lm: CausalLM, adapter: dict[str, torch.Tensor], out_dir, base_model_name_or_path: str, label_prior: dict[str, float] | None = None,
                prediction: dict | None = None) -> Path:
    """Write one user's adapter (no user axis) as a PEFT LoRA directory plus its soft prompt; returns the path.

    ``label_prior`` (label → offset), for banks of classification / rating tasks, is recorded in
    ``pmeta_export.json``: pmeta adds it to log p(label | prompt) before choosing a label.
    ``prediction`` (``task``, ``kind``, ``labels``, ``decode``: argmax / expected / greedy,
    ``max_new_tokens``, ``retrieve``, ``max_length``), from a text bank, is recorded there too, and
    the README shows how pmeta turns scores into a prediction with it."""
    from peft import LoraConfig

    out = as_path(out_dir, "export folder", InvalidRequest)
    if not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        raise InvalidRequest("base_model_name_or_path must be a non-empty string (the base model's id or folder)")
    for key, value in adapter.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidRequest(f"adapter[{key!r}] must be a tensor, not {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidRequest(f"adapter[{key!r}] holds NaN or infinite values")
    if label_prior is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in label_prior.values()):
        raise InvalidRequest("label_prior must map labels to finite numbers")
    keys = [k[:-2] for k in adapter if k.endswith(".A")]
    if not keys:
        raise InvalidRequest("the adapter has no LoRA factors to export")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key in keys:
        a, b = adapter.get(key + ".A"), adapter.get(key + ".B")
        if b is None or a.dim() != 2 or b.dim() != 2:
            raise InvalidRequest(f"LoRA target {key!r} needs A (r, d_in) and B (d_out, r) without a user axis")
        try:
            module = lm.module_name(key)
        except KeyError:
            raise InvalidRequest(f"{key!r} is not a LoRA target of {lm.name!r}") from None
        if a.shape[0] != b.shape[1]:
            raise InvalidRequest(f"LoRA factors of {key!r} disagree on the rank: A {tuple(a.shape)}, B {tuple(b.shape)}")
        ranks[module] = int(a.shape[0])
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    rank = max(ranks.values())
    all_keys = [s[0] for s in lm.lora_shapes()]
    names = sorted({k.rsplit(".", 1)[1] for k in keys})
    # the short form (projection names) when every layer is covered, else the exact module names
    covers_all = sorted(keys) == sorted(k for k in all_keys if k.rsplit(".", 1)[1] in names)
    target_modules = names if covers_all else sorted(ranks)
    odd = {m: r for m, r in ranks.items() if r != rank}  # ranks may differ per target: scaling stays 1 through alpha
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=target_modules, lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        rank_pattern={re.escape(m): r for m, r in odd.items()}, alpha_pattern={re.escape(m): r for m, r in odd.items()},
        inference_mode=True,
    )
    prompt = adapter.get("prompt")
    if prompt is not None and prompt.dim() != 2:
        raise InvalidRequest(f"the soft prompt must be (l, d) without a user axis, got {tuple(prompt.shape)}")
    length = 0 if prompt is None else int(prompt.shape[0])

    try:
        target = out.resolve() if out.is_symlink() else out  # a link to an export: the export it points to is replaced
        _check_target(target)
        _write(target, config, tensors, prompt, length, lm, base_model_name_or_path, rank, target_modules, label_prior, prediction)
    except OSError as error:  # a name too long, a read-only or virtual file system, no permission
        if not is_path_error(error):
            raise  # a full disk, an I/O error: the machine's state, not a bad request
        raise InvalidRequest(f"cannot export to {out}: {os_error_message(error)}") from None
    return out


def _check_target(out: Path, tries: int = 8) -> None:
    """Refuse a target that is not new, empty or a previous export (a folder holding only an
    export's own files). Safe beside a concurrent export to the same folder: a listing counts only
    when the folder at ``out`` is the same before and after it (a folder being swapped out and
    removed lists a part of its files), and a folder moved away reads as absent."""
    if not out.parent.is_dir():
        raise InvalidRequest(f"cannot export to {out}: {out.parent} is not a directory")
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise InvalidRequest(f"cannot export to {out}: it is the current directory or holds it (an export replaces its folder); choose a new or empty directory below it")
    for _ in range(tries):
        try:
            before = os.stat(out)
            if not stat.S_ISDIR(before.st_mode):
                raise InvalidRequest(f"{out} is a file, not a directory; choose an empty or new directory")
            with os.scandir(out) as listing:
                entries = {e.name: e.is_file(follow_symlinks=False) for e in listing}
            after = os.stat(out)
        except FileNotFoundError:  # not there, or just moved aside by a concurrent export
            return
        if (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino):
            break
    if entries:
        foreign = sorted(name for name, regular in entries.items() if name not in EXPORT_FILES or not regular)
        if foreign or not entries.get(MARKER):
            what = f"holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which a pmeta export does not write" if foreign else "is not a pmeta export"
            raise InvalidRequest(f"{out} exists and {what}; choose an empty or new directory")


def _write(out: Path, config, tensors: dict[str, torch.Tensor], prompt: torch.Tensor | None, length: int, lm: CausalLM,
           base_model_name_or_path: str, rank: int, target_modules: list[str], label_prior: dict[str, float] | None,
           prediction: dict | None = None) -> None:
    """The export's files in a temporary sibling, then renamed into place (an existing export is replaced)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        config.save_pretrained(str(tmp))
        _canonical_config(tmp / "adapter_config.json")
        save_tensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        _canonical_safetensors(tmp / "adapter_model.safetensors")
        after_bos = lm.prompt_after_bos and lm.bos_id is not None
        if length:
            metadata = {"insert": "after_bos" if after_bos else "start", **({"bos_token_id": str(lm.bos_id)} if after_bos else {})}
            save_tensors({"prompt": prompt.detach().float().cpu().contiguous()}, tmp / "soft_prompt.safetensors", metadata=metadata)
            _canonical_safetensors(tmp / "soft_prompt.safetensors")
        (tmp / MARKER).write_text(json.dumps({
            "base_model_name_or_path": base_model_name_or_path, "rank": rank, "targets": target_modules,
            "soft_prompt_length": length, "soft_prompt_insert": "after_bos" if after_bos else "start",
            "bos_token_id": lm.bos_id,
            **({"label_prior": label_prior} if label_prior else {}),
            **({"prediction": prediction} if prediction else {}),
        }, indent=2))
        readme = README.format(base=base_model_name_or_path, rank=rank, targets=", ".join(target_modules), dirname=out.name)
        at_rule = f"1 if ids[0, 0] == {lm.bos_id} else 0" if after_bos else "0"
        if length:
            readme += README_PROMPT.format(
                dirname=out.name, length=length, hidden=lm.hidden_size,
                where=f"right after the first token when it is the BOS token (id {lm.bos_id}), else before everything" if after_bos else "before every token",
                at_rule=at_rule,
            )
        if prediction:  # a text bank's personalization, with or without a soft prompt (prompt_length 0)
            readme += prediction_readme(prediction, out.name, at_rule, soft_prompt=bool(length))
        elif label_prior:
            readme += ("\n## Label prior\n\npmeta scores each label as `log p(label | prompt) + label_prior[label]` "
                       "(the offsets are in `pmeta_export.json`) and predicts from those scores.\n")
        (tmp / "README.md").write_text(readme)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)  # its entries are on disk before any name points at it
        _swap_in(tmp, out)
        _fsync_dir(out.parent)  # the rename (or exchange) itself
    finally:
        _remove(tmp)  # a failed write's files, or the previous export the exchange left here


def _canonical_config(path: Path) -> None:
    """Rewrite PEFT's ``adapter_config.json`` the same in every process: PEFT keeps ``target_modules``
    as a set (written in hash order, which varies with ``PYTHONHASHSEED``); here it is sorted, and
    so are the keys."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors file's JSON header canonically: sorted keys, compact separators, padded
    with spaces to a multiple of 8 as ``safetensors`` pads it; the tensor bytes are kept as they are.
    ``safetensors`` keeps ``__metadata__`` in a Rust ``HashMap``, whose order differs per process."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    if text != data[8 : 8 + size]:
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


#: ``renameat2``'s flag that swaps two existing names atomically (linux/fs.h), and "relative to the working directory".
RENAME_EXCHANGE, AT_FDCWD = 2, -100
#: ``renameat2`` errors that mean "not here" (no such call in the kernel, a file system without
#: exchange, a container's seccomp filter answering an unknown call with EPERM): the two-rename swap
#: is used instead, and it meets any real error (a permission, a busy folder) again and raises it.
NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM})


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's ``renameat2`` (Linux, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two existing names ``a`` and ``b`` in one atomic step; False (nothing done) where the
    system cannot, an ``OSError`` for any other failure (nothing done either)."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries durable (where the system allows fsync on a folder)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a folder one may write to but not list: nothing to sync through
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path, tries: int = 8) -> None:
    """Put the finished ``tmp`` at ``out``: a plain rename when there is no previous export, else
    one atomic exchange (Linux ``renameat2``), after which ``tmp`` holds the previous export for the
    caller to remove. ``out`` then never goes missing, even if the process is killed.

    Without the exchange, the previous export is moved aside, ``tmp`` renamed, and the previous one
    removed; if the final rename fails, the previous export is put back before the error
    propagates. Another export landing at ``out`` meanwhile (a concurrent export to the same folder:
    the rename then finds ``out`` not empty) is replaced in turn, after the same check as before
    the write, so every export lands whole and the last one wins."""
    for attempt in range(tries):
        old = None
        if out.exists():
            _check_target(out)
            try:
                if _exchange(tmp, out):
                    return
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(out, old)
            except FileNotFoundError:  # another export (swapping by two renames) moved it aside first
                old = None
        try:
            os.rename(tmp, out)
        except OSError as error:
            if old is not None:
                try:
                    os.rename(old, out)  # put the previous export back
                except OSError:  # another export is there now: the previous one is stale
                    _remove(old)
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt + 1 < tries:
                continue  # another export landed between the two renames
            raise
        if old is not None:
            _remove(old)
        return


def _remove(path: Path) -> None:
    """Remove a moved-aside export (a link, should one have been swapped in, is unlinked, not followed)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)

"""The text personalization model: causal LM + anchors + stacked adapter, for one LaMP task.

Serving and meta-training share every method here:

    profile ─► user key (mean MiniLM embedding of the profile texts) ─► top-k anchors (FAISS)
            ─► fuse (exact concatenation) ─► inner steps on the stacked adapter over the support pairs
            ─► personal parameters ─► predict (label scores, expected rating, or greedy generation)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..adapt.inner import adapt
from ..data.lamp import profile_text, task_spec
from ..fusion.fuse import PriorCache, fuse_users, fusion_weights
from ..fusion.index import AnchorIndex
from ..models.personal import Adapter, expand_users, stack
from ..retrieval.bm25 import bm25_top_k
from .config import TextConfig
from .prompts import Pair, PromptBuilder, support_pair


@dataclass
class TextTensors:
    """Every learned tensor of a text bank version (what its safetensors file holds)."""

    global_adapter: Adapter
    global_step_sizes: dict[str, torch.Tensor]
    anchors: Adapter  # leading anchor axis
    anchor_keys: torch.Tensor  # (A, d) unit keys
    anchor_sizes: torch.Tensor  # (A,)
    stack_init: Adapter
    stack_step_sizes: dict[str, torch.Tensor]
    log_temperature: torch.Tensor
    label_bias: torch.Tensor | None = None  # (n_labels,) learned label prior of classification / rating tasks

    def to_flat(self) -> dict[str, torch.Tensor]:
        flat = {"anchor_keys": self.anchor_keys, "anchor_sizes": self.anchor_sizes, "log_temperature": self.log_temperature}
        if self.label_bias is not None:
            flat["label_bias"] = self.label_bias
        for prefix, group in [("global", self.global_adapter), ("global_lr", self.global_step_sizes), ("anchors", self.anchors),
                              ("stack", self.stack_init), ("stack_lr", self.stack_step_sizes)]:  # fmt: skip
            for key, value in group.items():
                flat[f"{prefix}/{key}"] = value
        return {k: v.detach().contiguous().cpu() for k, v in flat.items()}

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> "TextTensors":
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + "/")}

        return cls(group("global"), group("global_lr"), group("anchors"), flat["anchor_keys"], flat["anchor_sizes"],
                   group("stack"), group("stack_lr"), flat["log_temperature"], flat.get("label_bias"))  # fmt: skip


def gather_rows(personal: Adapter, rows: torch.Tensor) -> Adapter:
    """Row ``i`` of the result is user ``rows[i]``'s parameters (gradients flow back to each user)."""
    return {k: v[rows] for k, v in personal.items()}


def inner_init(adapter: Adapter) -> Adapter:
    """Detached copy where only the LoRA factors require grad: the inner steps tune the LoRA, not the prompt."""
    return {k: v.detach().clone().requires_grad_(k != "prompt") for k, v in adapter.items()}


def lora_targets(lm, layers: int) -> list[tuple[str, int, int]]:
    """The LM's LoRA targets in its top ``layers`` layers (every layer for 0)."""
    shapes = lm.lora_shapes()
    if layers <= 0:
        return shapes
    depth = max(int(key.split(".")[1]) for key, _, _ in shapes) + 1
    return [s for s in shapes if int(s[0].split(".")[1]) >= depth - layers]


class TextModel:
    def __init__(self, config: TextConfig, lm, encoder, tensors: TextTensors | None = None, index: AnchorIndex | None = None) -> None:
        self.config = config
        self.spec = task_spec(config.task)
        self.lm = lm
        self.encoder = encoder
        self.t = tensors
        self.index = index if index is not None or tensors is None else AnchorIndex.build(tensors.anchor_keys.numpy())
        self.prompts = PromptBuilder(self.spec.name, config.max_prompt_tokens, config.item_chars, self._count_tokens())
        self.labels = list(self.spec.labels or ())
        # memo of formatted prompts; a dict only in builds (as key_cache): a serving process keeps no
        # user's text beyond the call that formats it (personalize memoises within the call)
        self.prompt_cache: dict | None = None
        self.key_cache: dict[str, torch.Tensor] | None = None  # see embed()
        self.prior_cache = PriorCache()  # the zero-history prior, rebuilt only when the anchors change

    def _count_tokens(self):
        tokenizer = getattr(self.lm, "tokenizer", None)
        if tokenizer is None:
            return None
        lock = getattr(self.lm, "_tokenizer_lock", None) or contextlib.nullcontext()  # as every LM tokenizer call

        def count(text: str) -> int:
            with lock:
                return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        return count

    # ------------------------------------------------------------------ texts
    def profile_texts(self, profile: list[dict]) -> list[str]:
        return [profile_text(self.spec.name, item, self.config.item_chars) for item in profile]

    def support_pairs(self, profile: list[dict]) -> list[Pair]:
        """The support pairs of a profile: its ``support_max`` most recent items."""
        c = self.config
        items = profile[-c.support_max :] if c.support_max else []
        return [support_pair(self.spec, item, c.input_prefix, c.support_chars, c.target_chars) for item in items]

    def pair_prompt(self, pair: Pair, cache: dict | None = None) -> str:
        """The formatted prompt of a support or query pair, memoised in ``cache`` (else in
        ``prompt_cache`` when it is a dict; else not at all): the inner steps reuse it."""
        cache = self.prompt_cache if cache is None else cache
        if cache is None:
            return self.lm.format_prompt(self.prompts.text(pair.input, list(pair.retrieved)))
        key = pair.input if not pair.retrieved else (pair.input, tuple(self.profile_texts(list(pair.retrieved))))
        prompt = cache.get(key)
        if prompt is None:
            prompt = self.lm.format_prompt(self.prompts.text(pair.input, list(pair.retrieved)))
            if len(cache) > 50_000:
                cache.clear()
            cache[key] = prompt
        return prompt

    def retrieved(self, input_text: str, profile: list[dict] | None, retrieve: int) -> list[dict]:
        """The ``retrieve`` best BM25 items of ``profile`` for ``input_text``, best first."""
        if retrieve <= 0 or not profile:
            return []
        from ..data.lamp import query_text, retrieval_text

        ranked = bm25_top_k(query_text(self.spec.name, input_text), [retrieval_text(self.spec.name, item) for item in profile], retrieve)
        return [profile[i] for i in ranked]

    def query_prompt(self, input_text: str, profile: list[dict] | None = None, retrieve: int = 0) -> str:
        """The formatted prompt of an input, with the ``retrieve`` best BM25 profile items when asked."""
        return self.query_prompt_and_items(input_text, profile, retrieve)[0]

    def query_prompt_and_items(self, input_text: str, profile: list[dict] | None = None, retrieve: int = 0) -> tuple[str, int]:
        """:meth:`query_prompt`, and how many retrieved items it holds (fewer than asked when the
        profile is shorter or the prompt's token budget drops the least relevant)."""
        text, kept = self.prompts.text_and_items(input_text, self.retrieved(input_text, profile, retrieve))
        return self.lm.format_prompt(text), kept

    # ------------------------------------------------------------------ losses
    def option_scores(self, prompts: list[str], personal: Adapter | None, prior: bool = True) -> torch.Tensor:
        """Label scores (U, n_labels): log p(label | prompt) under the LM, plus the bank's learned label
        prior when ``prior`` (a per-label offset meta-trained on the train users; contextual calibration
        in the sense of Zhao et al. 2021, initialised in closed form at build, see text/build.py)."""
        scores = self.lm.option_logprobs(prompts, self.labels, personal)
        bias = self.t.label_bias if (prior and self.t is not None) else None
        return scores if bias is None else scores + bias.to(scores.dtype)

    def pairs_loss(self, pairs: list[list[Pair]], personal: Adapter | None, prior: bool = True, cache: dict | None = None) -> torch.Tensor:
        """Sum over users of the mean loss of their pairs: cross-entropy over the task's labels for
        "options" pairs (with the learned label prior when ``prior``), mean token NLL of the output for
        "text" pairs. ``personal`` has the user axis; ``cache`` memoises prompts (:meth:`pair_prompt`)."""
        total = torch.zeros(())
        option_rows, option_prompts, option_targets, option_weights = [], [], [], []
        text_rows, text_prompts, text_targets, text_weights = [], [], [], []
        for user, user_pairs in enumerate(pairs):
            for pair in user_pairs:
                weight = 1.0 / len(user_pairs)
                prompt = self.pair_prompt(pair, cache)
                if pair.kind == "options" and pair.output in self.labels:
                    option_rows.append(user)
                    option_prompts.append(prompt)
                    option_targets.append(self.labels.index(pair.output))
                    option_weights.append(weight)
                elif pair.kind == "text" or self.spec.kind == "generation":
                    text_rows.append(user)
                    text_prompts.append(prompt)
                    text_targets.append(pair.output)
                    text_weights.append(weight)
        if option_rows:
            rows = gather_rows(personal, torch.tensor(option_rows)) if personal is not None else None
            logprobs = torch.log_softmax(self.option_scores(option_prompts, rows, prior), dim=-1)
            picked = logprobs[torch.arange(len(option_rows)), torch.tensor(option_targets)]
            total = total - (picked * torch.tensor(option_weights)).sum()
        if text_rows:
            # lm_loss sums the rows' mean token NLL; rows are grouped by weight so each user's pairs average.
            for weight in sorted(set(text_weights)):
                chosen = [i for i, w in enumerate(text_weights) if w == weight]
                rows = gather_rows(personal, torch.tensor([text_rows[i] for i in chosen])) if personal is not None else None
                loss = self.lm.lm_loss([text_prompts[i] for i in chosen], [text_targets[i] for i in chosen], rows)
                total = total + weight * loss
        return total

    # ------------------------------------------------------------------ personal parameters
    def user_keys(self, profiles: list[list[dict]]) -> np.ndarray:
        """Unit keys (U, d): mean sentence embedding of each profile's texts; zero for an empty profile."""
        keys = np.zeros((len(profiles), self.t.anchor_keys.shape[1]), dtype=np.float32)
        texts = [self.profile_texts(p) for p in profiles]
        flat = [text for group in texts for text in group]
        if not flat:
            return keys
        embeddings = self.embed(flat)
        start = 0
        for row, group in enumerate(texts):
            if group:
                mean = embeddings[start : start + len(group)].mean(0)
                keys[row] = (mean / mean.norm().clamp_min(1e-12)).numpy()
            start += len(group)
        return keys

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings (n, d); memoised by text when ``key_cache`` is a dict (builds and evaluations)."""
        if self.key_cache is None:
            return self.encoder.sentence_embeddings(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.key_cache))
        if missing:
            for text, row in zip(missing, self.encoder.sentence_embeddings(missing)):
                self.key_cache[text] = row
        return torch.stack([self.key_cache[t] for t in texts])

    def temperature(self) -> torch.Tensor:
        return self.t.log_temperature.exp()

    def retrieve(self, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = self.index.search(keys, self.config.top_k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()

    def fused(self, keys: np.ndarray) -> tuple[Adapter, dict]:
        """Fused anchors per user (the zero-history prior for users with a zero key)."""
        sims, idx = self.retrieve(keys)
        weights = fusion_weights(sims, self.temperature())
        has_key = self.has_key(keys)
        fused, fused_ranks = fuse_users(self.t.anchors, idx, weights, has_key, self.t.anchor_sizes, prior=self.prior_cache)
        return fused, {"anchors": idx.tolist(), "weights": weights.tolist(), "has_key": has_key.tolist(), "fused_ranks": fused_ranks}

    @staticmethod
    def has_key(keys: np.ndarray) -> torch.Tensor:
        """(U,) bool: users whose key is not zero (an empty profile has none: the zero-history prior)."""
        return torch.from_numpy(np.linalg.norm(keys, axis=1) > 0)

    def personalize(self, profiles: list[list[dict]], steps: int | None = None, timings: dict | None = None) -> tuple[Adapter, dict]:
        """Personal parameters (user axis) of each profile: retrieve, fuse, inner steps on the stack."""
        steps = self.config.inner_steps if steps is None else steps
        clock = time.perf_counter()
        keys = self.user_keys(profiles)
        t_embed = time.perf_counter()
        with torch.no_grad():
            fused, details = self.fused(keys)
        t_fuse = time.perf_counter()
        pairs = [self.support_pairs(p) for p in profiles]
        init = inner_init(expand_users(self.t.stack_init, len(profiles)))
        if steps > 0 and any(pairs):
            prompts: dict = {}  # this call's users' prompts, formatted once for every step, dropped on return
            with torch.enable_grad():
                adapted = adapt(init, lambda full: self.pairs_loss(pairs, full, cache=prompts), steps, self.t.stack_step_sizes, fixed=fused)
        else:
            adapted = init
        personal = {k: v.detach() for k, v in stack(fused, adapted).items()}
        if timings is not None:
            done = time.perf_counter()
            timings.update(embed_ms=(t_embed - clock) * 1e3, retrieve_fuse_ms=(t_fuse - t_embed) * 1e3, adapt_ms=(done - t_fuse) * 1e3, total_ms=(done - clock) * 1e3)
        return personal, details

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, prompts: list[str], personal: Adapter | None, decode: str | None = None, prior: bool = True) -> list[str]:
        """Predictions for formatted prompts (row i uses user row i of ``personal``, or the bare LM).
        ``prior=False`` scores labels under the LM alone (the baselines: no learned label prior)."""
        if self.spec.kind == "generation":
            return [text.strip() for text in self.lm.generate(prompts, personal, self.config.max_new_tokens)]
        scores = self.option_scores(prompts, personal, prior)
        return self.decode(scores, decode)

    def decode(self, scores: torch.Tensor, decode: str | None = None) -> list[str]:
        decode = decode or self.config.rating_decode
        if self.spec.kind == "rating" and decode == "expected":
            values = torch.tensor([float(label) for label in self.labels])
            expected = torch.softmax(scores.float(), dim=-1) @ values
            return [f"{float(v):.3f}" for v in expected]
        return [self.labels[int(i)] for i in scores.argmax(-1)]

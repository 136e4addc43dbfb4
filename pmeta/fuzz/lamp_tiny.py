"""Helpers of the text-bank tests: tiny hand-written LaMP-3 / LaMP-4 files and a tiny random Llama
(its own small byte-level BPE tokenizer with a chat template), saved to a folder in seconds."""

from __future__ import annotations

import json
from pathlib import Path

RATING_PREFIX = "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without further explanation. review:"
TITLE_PREFIX = "Generate a title for the following product review:"

_WORDS = {
    "5": ["great strings bright tone love them", "perfect cable no hum works great", "excellent tuner fast and accurate", "best pedal ever warm sound"],
    "4": ["good stand sturdy enough", "nice picks a bit thin", "solid capo holds well mostly"],
    "2": ["cheap strap broke soon", "noisy cable crackles often", "tuner drifts and flickers"],
    "1": ["terrible pedal died in a week", "awful strings rust fast", "broken on arrival useless"],
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _items(user: int, n: int, mood: str) -> list[dict]:
    pool = [(score, text) for score in (["5", "4"] if mood == "happy" else ["1", "2"]) for text in _WORDS[score]]
    out = []
    for j in range(n):
        score, text = pool[(user + j) % len(pool)]
        out.append({"id": f"u{user}-{j}", "text": f"{text} item {j}", "score": score, "title": " ".join(text.split()[:3]), "date": f"2014-01-{j + 1:02d}"})
    return out


def write_lamp(folder: Path, task: str = "LaMP-3", users: dict[str, int] | None = None, profile: int = 4) -> Path:
    """train/dev/test questions + outputs for ``task`` (LaMP-3 rating or LaMP-4 title)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = users or {"train": 8, "dev": 2, "test": 4}
    offset = 0
    for split, count in users.items():
        questions, golds = [], []
        for i in range(count):
            user = offset + i
            mood = "happy" if user % 2 == 0 else "grumpy"
            items = _items(user, profile + 1, mood)
            query = items.pop()
            fields = ("text", "score") if task == "LaMP-3" else ("title", "text")
            prof = [{"id": it["id"], **{f: it[f] for f in fields}, "date": it["date"]} for it in items]
            prefix = RATING_PREFIX if task == "LaMP-3" else TITLE_PREFIX
            questions.append({"id": f"{split}-{user}", "input": f"{prefix} {query['text']}", "profile": prof})
            golds.append({"id": f"{split}-{user}", "output": query["score"] if task == "LaMP-3" else query["title"]})
        offset += count
        (folder / f"{split}_questions.json").write_text(json.dumps(questions))
        (folder / f"{split}_outputs.json").write_text(json.dumps({"task": task.replace("-", "_"), "golds": golds}))
    return folder


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with a small BPE tokenizer and a chat template; ``seed``
    draws its weights (another seed: a same-shape, different model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [RATING_PREFIX, TITLE_PREFIX, "Earlier items of this user:", "rating title"] + [t for texts in _WORDS.values() for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder

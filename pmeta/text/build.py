"""Text bank build on a LaMP-format dataset: train users → anchors → three meta-training stages →
a new immutable bank version, published like the MovieLens banks (:mod:`pmeta.storage`).

1. Train users = the train split (each question with its profile and gold); the first
   ``validation_users`` of the dev split are validation users (never trained on).
2. User key = mean MiniLM embedding of the user's profile texts; anchors = spherical k-means (FAISS).
3. Meta-training, one loop (the MovieLens build's ``_optimize`` and strategies) with three stages:
   the global prior (prompt + LoRA over all train users), each anchor (initialised from the prior,
   over its cluster's users), and the stacked adapter's init (+ fusion temperature, + step sizes with
   MAML) through the very ``TextModel.personalize`` path that serving runs. An episode: support = a
   window of K ≤ ``train_support_max`` profile items turned into (input, output) pairs; query = the
   user's own question (+ ``query_items`` other profile items). Early stopping on validation users.
4. On validation users: the inner step size (×¼, ×1, ×4 of the configured one, then ×16, ×64, ... while
   the largest is still the best, up to ``max_inner_lr_factor``) and, for rating tasks,
   the decoder (argmax label or expected value) with the lower MAE are chosen and recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapt.inner import adapt
from ..adapt.strategies import get_strategy
from ..bank.build import _unit, choose_anchors
from ..bank.meta_train import _optimize
from ..data.lamp import LampExample, load_split, score_label, task_spec, truncate_profile
from ..errors import InvalidConfig, InvalidData
from ..fusion.fuse import fuse_users, fusion_weights
from ..models.device import cpu_only
from ..models.personal import Adapter, expand_users, stack
from ..progress import Progress
from .config import TextConfig
from .model import TextModel, TextTensors, lora_targets
from .prompts import Pair, input_prefix, query_pair, support_pair

TENSORS_FILE = "tensors.safetensors"
INDEX_FILE = "anchors.faiss"
BUILD_FILE = "build.json"


@dataclass
class TextBuildResult:
    version: str
    seconds: float
    validation: dict
    train_users: int
    validation_users: int


@dataclass
class Episode:
    users: list[int]
    support: list[list[Pair]]
    query: list[list[Pair]]
    keys: np.ndarray  # (U, d) unit keys of the support items


def lm_window(config: TextConfig) -> int:
    """Tokens the causal LM takes per sequence: the prompt budget and room for the answer (256, the
    bound of ``max_new_tokens``), at least 512. A fixed 512 cut a larger budget's prompts from the
    left, instruction first."""
    return max(512, config.max_prompt_tokens + 256)


def load_lm(config: TextConfig):
    from ..models.causal_lm import CausalLM

    return CausalLM(config.lm, device=config.device, targets=tuple(config.lora_targets), max_length=lm_window(config))


def _split_prompt(adapter: Adapter) -> tuple[Adapter, Adapter]:
    """(fixed, init): the prompt stays fixed in the inner loop (rank-0 LoRA beside it), the LoRA adapts."""
    fixed: Adapter = {"prompt": adapter["prompt"]}
    init: Adapter = {"prompt": torch.zeros_like(adapter["prompt"]).detach()}
    for key, value in adapter.items():
        if key.endswith(".A"):
            fixed[key] = value[..., :0, :]
            init[key] = value
        elif key.endswith(".B"):
            fixed[key] = value[..., :0]
            init[key] = value
    return fixed, init


class Episodes:
    """Meta-training episodes over train users, with cached profile-item embeddings for their keys."""

    def __init__(self, model: TextModel, examples: list[LampExample], embeddings: list[torch.Tensor], config: TextConfig, seed: int) -> None:
        self.model = model
        self.examples = examples
        self.embeddings = embeddings
        self.config = config
        self.spec = task_spec(config.task)
        self.rng = np.random.default_rng(seed)
        self.users = np.arange(len(examples))
        self._queries: dict[str, Pair] = {}

    def sample(self, count: int, pool: np.ndarray | None = None) -> Episode:
        pool = self.users if pool is None else pool
        chosen = self.rng.choice(pool, size=count, replace=len(pool) < count)
        return self.episode([int(u) for u in chosen])

    def episode(self, users: list[int]) -> Episode:
        c = self.config
        support, query, keys = [], [], []
        for user in users:
            example = self.examples[user]
            profile = example.profile
            k = int(self.rng.integers(c.support_min, max(c.support_min, min(c.train_support_max, len(profile) - 1)) + 1))
            k = min(k, len(profile))
            start = int(self.rng.integers(0, len(profile) - k + 1))
            window = list(range(start, start + k))
            support.append([support_pair(self.spec, profile[i], c.input_prefix, c.support_chars, c.target_chars) for i in window])
            rest = [i for i in range(len(profile)) if i not in window]
            extra = self.rng.choice(rest, size=min(c.query_items, len(rest)), replace=False).tolist() if rest else []
            query.append([self.model_query(example)]
                         + [support_pair(self.spec, profile[i], c.input_prefix, c.support_chars, c.target_chars) for i in extra])  # fmt: skip
            mean = self.embeddings[user][window].mean(0)
            keys.append((mean / mean.norm().clamp_min(1e-12)).numpy())
        return Episode(users, support, query, np.stack(keys).astype(np.float32))

    def model_query(self, example: LampExample) -> Pair:
        """The user's own question as a query pair, with retrieval when the bank trains with it (memoised)."""
        cached = self._queries.get(example.id)
        if cached is None:
            cached = self._queries[example.id] = query_with_retrieval(self.model, example)
        return cached


def query_with_retrieval(model: TextModel, example: LampExample) -> Pair:
    """A question as a query pair; with ``train_with_retrieval`` its prompt carries the ``retrieve`` best
    BM25 items among the user's ``support_max`` most recent profile items, what ``pmeta+retrieval``
    puts in the prompt at serving time for a profile of at most ``support_max`` items (serving
    searches a longer profile whole)."""
    c = model.config
    pair = query_pair(task_spec(c.task), example, c.support_chars, c.target_chars)
    if not (c.train_with_retrieval and c.retrieve > 0):
        return pair
    recent = truncate_profile(example.profile, c.support_max)
    return Pair(pair.input, pair.output, pair.kind, tuple(model.retrieved(pair.input, recent, c.retrieve)))


def _stage_global(model: TextModel):
    def build(episode: Episode):
        fixed, init = _split_prompt(expand_users(model.t.global_adapter, len(episode.users)))
        return init, fixed, model.t.global_step_sizes

    return build


def _stage_anchors(model: TextModel, assignment: np.ndarray):
    def build(episode: Episode):
        idx = torch.tensor([int(assignment[u]) for u in episode.users], dtype=torch.long)
        fixed, init = _split_prompt({k: v[idx] for k, v in model.t.anchors.items()})
        return init, fixed, model.t.global_step_sizes

    return build


def _stage_stack(model: TextModel):
    def build(episode: Episode):
        sims, idx = model.retrieve(episode.keys)
        weights = fusion_weights(sims, model.temperature())
        fixed, _ = fuse_users(model.t.anchors, idx, weights, model.has_key(episode.keys), model.t.anchor_sizes)  # the prior for an empty profile, as in serving
        init = {k: v for k, v in expand_users(model.t.stack_init, len(episode.users)).items()}
        return init, fixed, model.t.stack_step_sizes

    return build


def outer_loss(model: TextModel, build, strategy, episode: Episode, steps: int) -> torch.Tensor:
    init, fixed, step_sizes = build(episode)
    inner_pairs = [s + q for s, q in zip(episode.support, episode.query)] if strategy.inner_on_query else episode.support
    adapted = adapt(init, lambda full: model.pairs_loss(inner_pairs, full), steps, step_sizes, fixed=fixed, create_graph=strategy.second_order)
    return strategy.outer_loss(init, adapted, lambda params: model.pairs_loss(episode.query, stack(fixed, params))) / len(episode.users)


def _validation(model: TextModel, examples: list[LampExample]) -> tuple[list[list[dict]], list[list[Pair]]]:
    profiles = [e.profile for e in examples]
    queries = [[query_with_retrieval(model, e)] for e in examples]
    return profiles, queries


def label_prior(model: TextModel, examples: list[LampExample], count: int = 64, batch: int = 8) -> torch.Tensor:
    """Closed-form init of the learned label prior: ``log p̂(label) − mean log p_LM(label | prompt)``.

    ``p̂`` is the train users' label frequency (add-one smoothed); the mean runs over up to ``count``
    train questions in the prompt meta-training uses, under the initial global adapter. Adding it
    to the LM's label log-probabilities makes the average prediction match the label frequencies
    (contextual calibration, Zhao et al. 2021, with the empirical prior); meta-training refines it.
    """
    labels = model.labels
    counts = np.ones(len(labels))
    for e in examples:
        out = (e.output or "").strip()
        if out in labels:
            counts[labels.index(out)] += 1
    log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    chosen = examples[:: max(1, len(examples) // count)][:count]
    rows = []
    with torch.no_grad():
        for start in range(0, len(chosen), batch):
            part = chosen[start : start + batch]
            prompts = [model.pair_prompt(query_with_retrieval(model, e)) for e in part]
            personal = expand_users(model.t.global_adapter, len(part))
            rows.append(torch.log_softmax(model.option_scores(prompts, personal, prior=False).float(), dim=-1))
    return (log_prior - torch.cat(rows).mean(0)).detach()


def validation_loss(model: TextModel, profiles, queries, steps: int | None = None) -> float:
    """Mean query loss of validation users after the serving path (retrieve, fuse, inner steps)."""
    personal, _ = model.personalize(profiles, steps)
    with torch.no_grad():
        return float(model.pairs_loss(queries, personal)) / max(1, len(profiles))


def read_train_dev(data: str | Path, task: str) -> tuple[list, list]:
    """The train questions with a gold output and at least 2 profile items, and the dev questions with
    a gold output (none when the folder has no readable dev split). InvalidData when train has none,
    or when a gold of either is not one of the task's labels (:func:`checked_golds`)."""
    train = [e for e in load_split(data, task, "train") if e.output is not None and len(e.profile) >= 2]
    if not train:
        raise InvalidData(f"{data}: the train split has no question with a gold output and at least 2 profile items")
    try:
        dev = [e for e in load_split(data, task, "dev") if e.output is not None]
    except InvalidData:
        dev = []
    return checked_golds(train, data, task, "train"), checked_golds(dev, data, task, "dev")


def checked_golds(examples: list[LampExample], data: str | Path, task: str, split: str) -> list[LampExample]:
    """The golds of a classification or rating task as its labels spell them (LaMP-3: "4.0" and 4 are
    "4", as profile scores are read), before any meta-training. A gold outside the labels would match
    no option: its pair would drop out of every loss and of the label prior without a word, and a dev
    gold used to be refused only after the whole meta-training. InvalidData names the file and question."""
    spec = task_spec(task)
    if spec.labels is None:
        return examples
    path = Path(data) / f"{split}_outputs.json"
    for e in examples:
        where = f"the output of question id {e.id[:40]!r}"
        if spec.kind == "rating":
            e.output = score_label(e.output, path, where)
        elif e.output.strip() in spec.labels:
            e.output = e.output.strip()
        else:
            shown = ", ".join(spec.labels[:5]) + (", …" if len(spec.labels) > 5 else "")
            raise InvalidData(f"{path} at {where}: {spec.name} outputs are one of {shown}, found {e.output[:40]!r}.")
    return examples


def build_text_model(data: str | Path, config: TextConfig, progress: Progress | None = None, lm=None, splits: tuple[list, list] | None = None) -> tuple[TextModel, dict]:
    """Meta-train a text model; ``splits`` is :func:`read_train_dev`'s result (read here when None)."""
    from ..bank.bank import shared_encoder

    progress = progress or Progress(False)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    spec = task_spec(config.task)
    config = config.model_copy(update={"task": spec.name})
    train, dev = splits if splits is not None else read_train_dev(data, spec.name)
    rng = np.random.default_rng(config.seed)
    if not dev:  # carve validation users out of train
        order = rng.permutation(len(train))
        n_val = min(config.validation_users, len(train) // 5)
        dev = [train[i] for i in order[:n_val]]
        train = [train[i] for i in sorted(order[n_val:])]
    dev = dev[: config.validation_users]
    if len(train) > config.max_train_users:
        train = [train[i] for i in sorted(rng.choice(len(train), config.max_train_users, replace=False))]
    config = config.model_copy(update={"input_prefix": input_prefix(spec.name, [e.input for e in train])})

    lm = lm or load_lm(config)
    encoder = shared_encoder(config.encoder, config.device)
    model = TextModel(config, lm, encoder)
    model.key_cache, model.prompt_cache = {}, {}  # the build's memos (the train and dev users' texts), dropped at its end
    texts = [model.profile_texts(e.profile) for e in train]
    flat = [t for group in texts for t in group]
    with progress.task("embedding profiles", len(flat)) as bar:
        embedded = encoder.sentence_embeddings(flat, batch_size=64, progress=bar.advance)
    embeddings, start = [], 0
    for group in texts:
        embeddings.append(embedded[start : start + len(group)])
        start += len(group)
    keys = _unit(np.stack([e.mean(0).numpy() for e in embeddings]))
    centroids, assignment = choose_anchors(keys, config.anchors, config.seed)
    n_anchors = len(centroids)
    sizes = np.bincount(assignment, minlength=n_anchors)

    generator = torch.Generator().manual_seed(config.seed)
    wanted = {key for key, _, _ in lora_targets(lm, config.lora_layers)}

    def fresh(rank: int) -> Adapter:
        adapter = lm.init_adapter(rank, config.prompt_length, generator)
        return {k: v for k, v in adapter.items() if k == "prompt" or k[:-2] in wanted}

    global_adapter = fresh(config.anchor_rank)
    stack_init = fresh(config.stack_rank)
    stack_init["prompt"] = torch.zeros_like(stack_init["prompt"])
    log_lr = math.log(config.inner_lr)
    lora_keys = [k for k in global_adapter if k != "prompt"]
    model.t = TextTensors(
        global_adapter=global_adapter,
        global_step_sizes={k: torch.tensor(log_lr) for k in lora_keys},
        anchors={k: v.unsqueeze(0).repeat(n_anchors, *([1] * v.dim())) for k, v in global_adapter.items()},
        anchor_keys=torch.from_numpy(centroids).float(),
        anchor_sizes=torch.from_numpy(sizes).float(),
        stack_init=stack_init,
        stack_step_sizes={k: torch.tensor(log_lr) for k in lora_keys},
        log_temperature=torch.tensor(math.log(config.temperature)),
    )
    from ..fusion.index import AnchorIndex

    model.index = AnchorIndex.build(centroids)
    t = model.t
    if model.labels and config.label_prior:
        with progress.task("label prior", 1) as bar:
            t.label_bias = label_prior(model, train)
            bar.advance(1)
    strategy = get_strategy(config.meta)
    episodes = Episodes(model, train, embeddings, config, seed=config.seed + 2)
    val_profiles, val_queries = _validation(model, dev)
    # early stopping: the stack stage keeps its best checkpoint; the prior and anchor stages are reverted together if they hurt
    checkpoint = (lambda: validation_loss(model, val_profiles, val_queries)) if config.early_stopping and dev else None
    learn_lr = config.meta == "maml" and config.inner_steps > 0
    losses: dict[str, list[float]] = {}
    validation: dict[str, float] = {}

    def run(name: str, build, groups: list[dict], steps: int, pool: np.ndarray | None = None, checkpoint=None) -> None:
        if steps <= 0:
            return
        with progress.task(f"meta-train {name}", steps) as bar:
            losses[name] = _optimize(
                groups,
                lambda: outer_loss(model, build, strategy, episodes.sample(config.meta_batch_users, pool), config.inner_steps),
                steps, lambda loss: bar.advance(1, loss=loss), checkpoint=checkpoint, every=max(config.validate_every, 1),
            )  # fmt: skip

    if dev:
        validation["start"] = validation_loss(model, val_profiles, val_queries)
    prior_group = {"label_bias": t.label_bias} if t.label_bias is not None else {}
    initial = ({k: v.clone() for k, v in t.global_adapter.items()}, {k: v.clone() for k, v in t.anchors.items()}, {k: v.clone() for k, v in prior_group.items()})
    groups = [{"params": list(t.global_adapter.values()), "lr": config.outer_lr}]
    if prior_group:
        groups.append({"params": [t.label_bias], "lr": config.label_prior_lr})
    if learn_lr:
        groups.append({"params": list(t.global_step_sizes.values()), "lr": config.outer_lr})
    run("global", _stage_global(model), groups, config.global_steps)
    for key, value in t.global_adapter.items():
        t.anchors[key] = value.detach().unsqueeze(0).repeat(n_anchors, *([1] * value.dim())).contiguous()
    run("anchors", _stage_anchors(model, assignment), [{"params": list(t.anchors.values()), "lr": config.outer_lr}], config.anchor_steps)
    if dev and (config.global_steps or config.anchor_steps):
        # early stopping of the prior and anchor stages together, on the serving path of validation users
        validation["anchors"] = validation_loss(model, val_profiles, val_queries)
        if config.early_stopping and validation["anchors"] > validation["start"]:
            with torch.no_grad():
                for group, saved in zip((t.global_adapter, t.anchors, prior_group), initial):
                    for k in group:
                        group[k].copy_(saved[k])
            validation["anchors_reverted"] = True
    groups = [{"params": [v for k, v in t.stack_init.items() if k != "prompt"], "lr": config.outer_lr}, {"params": [t.log_temperature], "lr": config.outer_lr}]
    if prior_group:
        groups.append({"params": [t.label_bias], "lr": config.label_prior_lr})
    if learn_lr:
        groups.append({"params": list(t.stack_step_sizes.values()), "lr": config.outer_lr})
    run("stack", _stage_stack(model), groups, config.stack_steps, checkpoint=checkpoint)

    chosen: dict[str, object] = {}
    if dev and config.inner_steps > 0 and not learn_lr:
        base = {k: v.clone() for k, v in t.stack_step_sizes.items()}
        trials = {}
        factors = [1.0, 0.25, 4.0]
        while factors:
            factor = factors.pop(0)
            for k in t.stack_step_sizes:
                t.stack_step_sizes[k] = base[k] + math.log(factor)
            trials[factor] = validation_loss(model, val_profiles, val_queries)
            if not factors and min(trials, key=trials.get) == max(trials) and factor < config.max_inner_lr_factor:
                factors.append(factor * 4)  # the largest step is still the best: keep growing it
        best = min(trials, key=trials.get)
        for k in t.stack_step_sizes:
            t.stack_step_sizes[k] = base[k] + math.log(best)
        chosen["inner_lr_factor"] = best
        chosen["inner_lr_trials"] = {str(k): v for k, v in trials.items()}
        validation["final"] = trials[best]
    elif dev:
        validation["final"] = validation_loss(model, val_profiles, val_queries)
    if dev and spec.kind == "rating":
        from ..eval.lamp_metrics import score

        personal, _ = model.personalize(val_profiles)
        prompts = [model.pair_prompt(q[0]) for q in val_queries]
        with torch.no_grad():
            scores = model.option_scores(prompts, personal)
        golds = {e.id: e.output for e in dev}
        by_decoder = {d: score(spec.name, dict(zip(golds, model.decode(scores, d))), golds) for d in ("argmax", "expected")}
        decoder = min(by_decoder, key=lambda d: by_decoder[d]["mae"])
        model.config = config = config.model_copy(update={"rating_decode": decoder})
        chosen["rating_decode"] = decoder
        chosen["rating_decode_validation"] = by_decoder
    model.config = config
    model.key_cache = model.prompt_cache = None
    record = {
        "kind": "text",
        "task": spec.name,
        "lm": config.lm,
        "lm_fingerprint": lm.fingerprint(),
        "seconds": time.perf_counter() - started,
        "validation": validation,
        "chosen": chosen,
        "losses": {k: [float(np.mean(v[i : i + 5])) for i in range(0, len(v), 5)] for k, v in losses.items()},
        "train_users": [e.id for e in train],
        "validation_users": [e.id for e in dev],
        "anchors": [{"position": a, "n_users": int(sizes[a]), "label": train[int(np.flatnonzero(assignment == a)[np.argmax(keys[assignment == a] @ centroids[a])])].id if sizes[a] else ""} for a in range(n_anchors)],
    }
    return model, record


def build_text_bank(data: str | Path, out: str | Path, config: TextConfig, db_url: str | None = None, progress: Progress | None = None, lm=None) -> TextBuildResult:
    """Build and publish a text bank version into ``out`` (atomic, checksummed; BankBusy if another build runs)."""
    from ..data.lamp import load_split as _load
    from ..storage import BankStore

    if not isinstance(config, TextConfig):
        raise InvalidConfig(f"config must be a TextConfig (pmeta.text.load_text_config(...)), not {type(config).__name__}")
    cpu_only(config.device, "text banks")
    store = BankStore(out, db_url)  # checks the path's type and the URL; touches nothing on disk
    progress = progress or Progress(False)
    spec = task_spec(config.task)
    try:
        test_ids = [e.id for e in _load(data, spec.name, "test")]
    except InvalidData:
        test_ids = []
    splits = read_train_dev(data, spec.name)  # bad data and a model that does not load fail before the bank folder exists
    lm = lm or load_lm(config)
    with store.new_version() as writer:
        model, record = build_text_model(data, config, progress, lm=lm, splits=splits)
        writer.write_tensors(TENSORS_FILE, model.t.to_flat())
        writer.write_bytes(INDEX_FILE, model.index.to_bytes())
        writer.write_json(BUILD_FILE, {**record, "config": model.config.model_dump()})
        version = writer.publish(
            config=model.config.model_dump(),
            dataset_name=f"{Path(data).name} ({spec.name})",
            dataset_fingerprint=dataset_fingerprint(data),
            anchors=record["anchors"],
            held_out_users=test_ids,
            notes=f"text {spec.name}; lm={model.config.lm}; meta={model.config.meta}",
        )
    store.close()
    return TextBuildResult(version, record["seconds"], record["validation"], len(record["train_users"]), len(record["validation_users"]))


def dataset_fingerprint(data: str | Path) -> str:
    """sha256 of the train and dev files of a LaMP-format folder: what a text bank was built on."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("train_questions.json", "train_outputs.json", "dev_questions.json", "dev_outputs.json"):
        path = Path(data) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()

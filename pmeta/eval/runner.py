"""``pmeta eval movielens``: the coldstart-v1 protocol for pmeta and every baseline, in one run.

Every method is a registered class (:data:`pmeta.eval.baselines.BASELINES`) created from one
:class:`EvalContext`; the protocol builds identical candidates for all of them. The bank-based
methods score through a PmetaModel for the evaluated catalogue: the bank's own in-domain, or the
bank transferred by item text (:mod:`pmeta.eval.transfer`) when the dataset is another catalogue.

Outputs (:func:`write_report`): ``report.json`` (``protocol``, ``dataset``, ``seed``, ``config``,
``results``, ``comparisons``: paired bootstrap CIs and Holm-adjusted p-values of pmeta against its rivals,
:mod:`pmeta.eval.significance`),
``report.md`` (one table per mode, method x K, then the paired differences) and PNG plots (:mod:`pmeta.eval.plots`).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from ..bank.bank import Bank
from ..bank.build import bank_training_priors, history_keys
from ..data.types import Dataset
from ..errors import InvalidConfig, ModesUnavailable
from ..progress import Progress
from . import neural, oppu, prompt_maml  # noqa: F401  (register the bank-based methods)
from ..config import MAX_SEED
from .baselines import BASELINES, EvalContext, check_options
from .output import remove_stale, write_text
from .plots import PLOT_FILES
from .protocol import MODES, PROTOCOL_NAME, check_cases, check_grid, evaluate, split_users
from .significance import BOOTSTRAP_RESAMPLES, compare_methods, markdown_lines
from ..tasks import time_prior
from .transfer import grid_edges, require_exponential, transfer_model, tuned_prior

#: Every method of a full report, in table order.
DEFAULT_METHODS = ("random", "popularity", "popularity-time", "itemknn", "ease", "backbone", "prompt-maml", "per-user-lora", "pmeta-no-steps", "pmeta", "pmeta-reptile")
#: Methods that need the MAML bank, or the Reptile bank.
BANK_METHODS = {"backbone", "prompt-maml", "per-user-lora", "pmeta-no-steps", "pmeta", "pmeta-bf16"}
REPTILE_METHODS = {"pmeta-reptile"}
#: Most bootstrap resamples a run takes (the resample table is resamples x users integers).
MAX_RESAMPLES = 100_000


#: Where a bank on another catalogue takes its time prior from (:func:`model_for`).
TRANSFER_PRIORS = ("source", "target", "tuned")


def model_for(bank: Bank, dataset: Dataset, seed: int, progress: Progress, test_fraction: float | None = None, transfer_prior: str = "source") -> tuple[object, dict | None]:
    """The bank's model for ``dataset``'s catalogue and, for another catalogue, the transfer summary.

    ``transfer_prior`` (another catalogue only): ``"source"`` reads the bank's time prior through the
    title match; ``"target"`` counts it again on ``dataset``'s train users of this seed
    (:func:`~pmeta.eval.transfer.recounted_prior`), as its ID baselines are trained on them, with the
    bank's h and β; ``"tuned"`` also chooses h and β on a tenth of those train users held out as
    validation users (:func:`~pmeta.eval.transfer.tuned_prior`), as the baselines tune themselves.
    Both need a bank with an exact time prior (checked before the catalogue is encoded).

    In-domain (same catalogue), the bank's held-out users must be this dataset's test users for this
    seed and the run's ``test_fraction`` (default: the bank's), so that no method is evaluated on
    users the bank trained on. On another catalogue no test user may have the history of one of the
    bank's train users (:func:`~pmeta.bank.build.history_keys`; the same data with one item added
    used to pass as a transfer, with most test users trained on).
    """
    if transfer_prior not in TRANSFER_PRIORS:
        raise InvalidConfig(f"transfer prior must be one of {', '.join(TRANSFER_PRIORS)}, got {transfer_prior!r}")
    if bank.catalog.item_ids == dataset.catalog.item_ids:
        if transfer_prior != "source":
            raise InvalidConfig(f"the transfer prior {transfer_prior!r} is for a bank built on another catalogue; this bank's time prior is already counted on this dataset's train users")
        fraction = bank.config.test_fraction if test_fraction is None else test_fraction
        _, test_users = split_users(dataset, seed=seed, test_fraction=fraction)
        held_out = set(bank.record.get("held_out_users", []))
        ids = dataset.ratings.user_ids
        if held_out and {ids[int(u)] for u in test_users} != held_out:
            raise InvalidConfig("the bank's held-out users differ from this dataset/seed's test users; evaluate with the bank's seed and dataset")
        if bank.config.crossfit_folds and bank.model.crossfit is None:
            # a bank built with cross-fitting: prompt-MAML, which meta-trains on the train users here,
            # gets the same cross-fitted time prior as the build's stages (pmeta.bank.crossfit)
            bank.model.crossfit = bank_training_priors(bank.model, bank.build_record, dataset).to(bank.model.t.item_text.device)
        return bank.model, None
    # another catalogue: the users are not matched by id (ids are per dataset), so by their histories
    known = bank.build_record.get("train_history_keys")
    if known is None:
        check = "the bank predates the check that no test user is one of its train users"
    elif not known:
        check = "the bank's data has no timestamps, so its train users carry no history keys and no test user could be checked against them"
    else:
        check = "checked"
    if not known:
        progress.log(f"note: bank {bank.version}: {check}; evaluate it only on data it was not built from")
    fraction = bank.config.test_fraction if test_fraction is None else test_fraction
    train_users, test_users = split_users(dataset, seed=seed, test_fraction=fraction)
    if known:
        seen = set(known) & set(history_keys(dataset, test_users))
        if seen:
            raise InvalidConfig(f"{len(seen)} of this run's {len(test_users)} test users have the rating history of one of the bank's train users (the bank's own data under another catalogue?); evaluate on users the bank never trained on")
    if transfer_prior != "source":
        require_exponential(bank.model.t.head)
    events = time_prior.rating_events(dataset, train_users) if transfer_prior == "target" else None
    model, summary = transfer_model(bank.model, bank.catalog, dataset.catalog, progress, prior_events=events)
    if transfer_prior == "tuned":  # every time_ tensor of the mapped source prior is replaced
        with progress.task("choosing the time prior on the target's validation users", None):
            model, choice = tuned_prior(model, dataset, train_users, seed=seed)
        summary = {**summary, "time_prior": "tuned", "time_prior_choice": choice}
    return model, {"bank_dataset": bank.record.get("dataset_name"), "test_users_checked": check == "checked", "test_users_check": check, **summary}


def bank_notes(bank: Bank | None, reptile_bank: Bank | None) -> list[str]:
    """What a reader of the report must know about the banks: a two-sided time prior (banks built
    before stop 47 count train users' ratings after the test user's time), a Reptile bank that was
    not meta-trained with Reptile (its row would be another method under that name) or that differs
    from the MAML bank in more than ``meta``."""
    notes = []
    for label, opened in (("bank", bank), ("Reptile bank", reptile_bank)):
        if opened is not None and time_prior.kind_of(opened.model.t.head) == "two-sided":
            notes.append(f"the {label} (version {opened.version}) has a two-sided time prior (built before stop 47, or with time_prior_causal = false): it scores each test user with train users' ratings made after the user's time as well")
    if reptile_bank is not None:
        if reptile_bank.config.meta != "reptile":
            notes.append(f"the Reptile bank (version {reptile_bank.version}) was meta-trained with meta = {reptile_bank.config.meta!r}: the pmeta-reptile row is not Reptile")
        elif bank is not None:
            mine, theirs = bank.config.model_dump(), reptile_bank.config.model_dump()
            differ = sorted(k for k in mine if k != "meta" and mine[k] != theirs.get(k))
            if differ:
                notes.append(f"the Reptile bank differs from the MAML bank in more than meta: {', '.join(differ)}")
    return notes


def _transfer_prior_line(transfer: dict) -> str:
    """Where a transferred bank's time prior came from, for report.md (nothing for a bank without one)."""
    kind = transfer.get("time_prior")  # absent in reports before stop 57: nothing said
    if kind == "source":
        return " Time prior: the bank's, read through the match (unmatched items at the median)."
    if kind == "target":
        return " Time prior: counted again on this dataset's train users, with the bank's h and β."
    if kind == "tuned":
        choice = transfer["time_prior_choice"]
        chosen = "none (β = 0)" if not choice["weight"] else f"h = {choice['bandwidth_days']:g} days, β = {choice['weight']:g}"
        edges = grid_edges(choice)
        edge = f" ({' and '.join(edges)})" if edges else ""
        return f" Time prior: counted again on this dataset's train users; {chosen}{edge}, chosen on {choice['validation_users']} of them held out as validation users ({choice['validation_cases']} with a case)."
    return ""


def _bank_summary(bank: Bank | None) -> dict | None:
    if bank is None:
        return None
    head = bank.model.t.head
    prior = time_prior.kind_of(head) or "none"
    return {"version": bank.version, "dataset": bank.record.get("dataset_name"), "time_prior": prior, "config": bank.config.model_dump()}


def check_request(methods, ks, modes, options: dict[str, dict] | None = None, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, dict]:
    """Everything about a run that can be wrong before any data is read or any bank built: the
    methods (known, none twice), K and the modes (:func:`~pmeta.eval.protocol.check_grid`), the seed,
    the number of bootstrap resamples, and each method's options
    (:func:`~pmeta.eval.baselines.check_options`; options of a registered method this run does not
    evaluate are checked too, and unused, so that one set of options serves runs of any methods).
    Returns the validated options; raises :class:`~pmeta.errors.InvalidConfig`."""
    methods = list(methods)
    if not methods:
        raise InvalidConfig("no method to evaluate")
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise InvalidConfig(f"unknown method {unknown[0]!r}; choose from {', '.join(sorted(BASELINES))}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise InvalidConfig(f"method {repeated[0]!r} is given twice")
    check_grid(ks, modes)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise InvalidConfig(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or not 1 <= resamples <= MAX_RESAMPLES:
        raise InvalidConfig(f"resamples must be an integer in 1..{MAX_RESAMPLES:,}, got {resamples!r}")
    return {method: check_options(method, values) for method, values in (options or {}).items()}


def evaluation_users(dataset: Dataset, modes: tuple[str, ...], seed: int = 0, test_fraction: float = 0.2, max_users: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train_users, test_users, cases)`` of a run (the seed's split, the first ``max_users`` test
    users, how many of them make a case), checked by :func:`~pmeta.eval.protocol.check_cases`:
    InvalidData when no test user makes a case or a sampled mode cannot draw its negatives. The CLI
    calls it before it builds a bank."""
    train_users, test_users = split_users(dataset, seed=seed, test_fraction=test_fraction)
    if max_users is not None:
        test_users = np.asarray(test_users)[:max_users]
    return train_users, test_users, check_cases(dataset, test_users, modes)


def drawable_run_modes(dataset: Dataset, seed: int = 0, test_fraction: float = 0.2, max_users: int | None = None) -> tuple[tuple[str, ...], str | None]:
    """``--mode auto``: the candidate modes of :data:`~pmeta.eval.protocol.MODES` that every test
    user of the run can draw, and why each of the others cannot (None when all can). A small
    catalogue cannot draw 99 sampled negatives for a user who rated most of it; full ranking always
    works. InvalidData when no test user makes a case, as :func:`evaluation_users`."""
    modes, reasons = [], []
    for mode in MODES:
        try:
            evaluation_users(dataset, (mode,), seed, test_fraction, max_users)
        except ModesUnavailable as error:
            reasons.append(error.reason)
        else:
            modes.append(mode)
    return tuple(modes), "; ".join(reasons) or None


def run_movielens(
    dataset: Dataset,
    bank: Bank | None,
    methods: list[str],
    ks: tuple[int, ...],
    modes: tuple[str, ...],
    seed: int = 0,
    max_users: int | None = None,
    progress: Progress | None = None,
    reptile_bank: Bank | None = None,
    options: dict[str, dict] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    per_user: dict | None = None,
    transfer_prior: str = "source",
) -> dict:
    """Evaluate every method on the test users of ``dataset`` (seed ``seed``); returns the report dict.

    ``options`` maps a method name to keyword arguments of its class (e.g.
    ``{"per-user-lora": {"steps": 10}}``). ``max_users`` keeps the first N test users (quick runs).
    ``resamples`` is the number of user resamples of each paired bootstrap (seeded with ``seed``).
    ``per_user``, if given, receives each method's per-user metrics (method -> the cells
    :func:`pmeta.eval.protocol.evaluate` fills), e.g. to pool several seeds' test users.
    ``transfer_prior``: for banks on another catalogue, where their time prior comes from
    (:func:`model_for`).
    """
    progress = progress or Progress(False)
    options = check_request(methods, ks, modes, options, seed, resamples)
    if bank is None and BANK_METHODS & set(methods):
        raise InvalidConfig(f"methods {', '.join(sorted(BANK_METHODS & set(methods)))} need a bank (--bank)")
    if reptile_bank is None and REPTILE_METHODS & set(methods):
        raise InvalidConfig("method pmeta-reptile needs a Reptile bank (--reptile-bank)")
    notes = bank_notes(bank, reptile_bank)
    for line in notes:
        progress.log(f"note: {line}")
    # the banks' held-out fraction (coldstart-v1's 0.2 without one); each bank is checked against it
    test_fraction = next((b.config.test_fraction for b in (bank, reptile_bank) if b is not None), 0.2)
    train_users, test_users, cases = evaluation_users(dataset, modes, seed, test_fraction, max_users)
    model, transfer = model_for(bank, dataset, seed, progress, test_fraction, transfer_prior) if bank is not None else (None, None)
    reptile_model, _ = model_for(reptile_bank, dataset, seed, progress, test_fraction, transfer_prior) if reptile_bank is not None else (None, None)
    context = EvalContext(dataset, train_users, seed=seed, model=model, reptile_model=reptile_model, options=options, progress=progress)
    results, cells, tuned = [], {}, {}
    for method in methods:
        torch.manual_seed(seed)
        scorer = BASELINES[method].create(context)
        with progress.task(f"evaluating {method}", cases * len(ks)) as bar:
            cells[method] = {}
            rows = evaluate(scorer, dataset, test_users, ks=ks, modes=modes, seed=seed, progress=lambda done, total: bar.advance(1), per_user=cells[method])
        for row in rows:
            row["method"] = method
            row["bytes_per_user"] = int(scorer.bytes_per_user)
        results.extend(rows)
        if getattr(scorer, "tuned", None):
            tuned[method] = scorer.tuned
    if per_user is not None:
        per_user.update(cells)
    return {
        "protocol": PROTOCOL_NAME,
        "dataset": {"name": dataset.name, "format": dataset.format, "fingerprint": dataset.fingerprint, "items": len(dataset.catalog), "users": dataset.ratings.n_users},
        "seed": seed,
        "config": {
            "ks": list(ks),
            "modes": list(modes),
            "methods": list(methods),
            "max_users": max_users,
            "test_fraction": test_fraction,  # the banks'; coldstart-v1 is 0.2
            "method_options": options,
            "tuned": tuned,  # EASE's λ, popularity-time's h (chosen on the train users' own validation split, or fixed)
            "bank": _bank_summary(bank),
            "reptile_bank": _bank_summary(reptile_bank),
            "transfer": transfer,
            "notes": notes,
            "bootstrap": {"resamples": resamples, "seed": seed},
            "environment": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 * 1024), 1),
            },
        },
        "results": results,
        "comparisons": compare_methods(cells, resamples=resamples, seed=seed),
    }


def _cell(row: dict | None) -> str:
    return "—" if row is None else f"{row['hr@10']:.3f} / {row['ndcg@10']:.3f} / {row['mrr']:.3f}"


def _how_tuned(chosen: dict, name: str = "λ") -> str:
    """How a ``tuned`` entry's value (``name``) came about, for report.md."""
    grid = sorted(float(lam) for lam in chosen.get("scores", {}))
    if chosen.get("fixed") or not grid:
        return "fixed"
    if len(grid) == 1:
        return "its grid's only value"
    span = f"{grid[0]:,g}–{grid[-1]:,g}"
    if chosen.get("validation") is None:
        return f"no validation user had a case to score the grid {span}: its largest {name}"
    return f"tuned over {span} by {chosen['validation']} on the train users' validation split"


def markdown(report: dict) -> str:
    """One table per mode (method x K: HR@10 / nDCG@10 / MRR), latency and storage per method, then the
    paired differences of each pmeta method (:func:`pmeta.eval.significance.markdown_lines`)."""
    rows = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    table = {(r["method"], r["k"], r["mode"]): r for r in rows}
    users = sorted({r["users"] for r in rows})
    lines = [f"# {report['protocol']} on {report['dataset']['name']} (seed {report['seed']})", ""]
    for note in report["config"].get("notes", []):
        lines += [f"Note: {note}.", ""]
    for method, chosen in report["config"].get("tuned", {}).items():
        if "lambda" in chosen:
            lines += [f"{method}: λ = {chosen['lambda']:,g} ({_how_tuned(chosen)}).", ""]
        elif "bandwidth_days" in chosen:
            lines += [f"{method}: h = {chosen['bandwidth_days']:,g} days ({_how_tuned(chosen, 'h')}).", ""]
    transfer = report["config"].get("transfer")
    if transfer:
        lines += [
            f"Transfer: bank built on {transfer['bank_dataset']}; {transfer['matched_items']} of {transfer['target_items']} items matched by title or its other names, {transfer['unseen_items']} unseen (text only)."
            + _transfer_prior_line(transfer)
            + ("" if transfer.get("test_users_checked", True) else f" Not checked: {transfer.get('test_users_check', 'the bank predates the check that no test user is one of its train users')}."),
            "",
        ]
    for mode in modes:
        lines += [f"## {mode} (HR@10 / nDCG@10 / MRR, {', '.join(map(str, users))} users)", ""]
        lines.append("| method | " + " | ".join(f"K = {k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(_cell(table.get((method, k, mode))) for k in ks) + " |")
        lines.append("")
    lines += ["## Adaptation latency (ms per user, p50 / p95) and bytes stored per user", ""]
    lines.append("| method | " + " | ".join(f"K = {k}" for k in ks) + " | bytes/user |")
    lines.append("|---|" + "---|" * (len(ks) + 1))
    for method in methods:
        cells = []
        for k in ks:
            row = next((r for r in rows if r["method"] == method and r["k"] == k), None)
            cells.append("—" if row is None else f"{row['adapt_ms_p50']:.1f} / {row['adapt_ms_p95']:.1f}")
        size = next(r["bytes_per_user"] for r in rows if r["method"] == method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {size} |")
    env = report["config"].get("environment", {})
    lines += ["", f"Peak RSS of the run: {env.get('peak_rss_mb', '?')} MB; torch threads: {env.get('threads', '?')}.", ""]
    lines += markdown_lines(report.get("comparisons", []), report["config"].get("bootstrap", {}).get("resamples", BOOTSTRAP_RESAMPLES))
    return "\n".join(lines)


def write_report(report: dict, out: Path, plots: bool = True) -> list[Path]:
    """Write report.json, report.md and (with ``plots``) the PNG plots into ``out``; returns the paths.

    Each file is replaced atomically; plots of an earlier run that this one does not redraw are removed."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text(out / "report.json", json.dumps(report, indent=2)), write_text(out / "report.md", markdown(report))]
    if plots:
        from .plots import write_plots

        written += write_plots(report, out)
    remove_stale(out, PLOT_FILES, written)  # e.g. a quality_pop99.png of a run with another --mode
    return written

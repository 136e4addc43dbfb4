"""The command line through a real subprocess: output formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "history.json"


def pmeta(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmeta", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


def test_adapt_json(tiny_bank):
    result = pmeta("adapt", "--bank", str(tiny_bank), "--user", "u123", "--history", str(EXAMPLE), "--top", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["user_id"] == "u123"
    assert len(out["recommendations"]) == 5
    assert {"item_id", "title", "score"} == set(out["recommendations"][0])
    assert {"total_ms", "adapt_ms"} <= set(out["timing_ms"])
    assert out["anchors"]


def test_adapt_text(tiny_bank):
    result = pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--top", "3")
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith(("1.", "2.", "3."))]) == 3


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "JSON"),
        ("[]", "history"),
        ('{"user_id": "u", "items": [{"item_id": "1", "rating": "five"}]}', "rating"),
        ('{"user_id": "u", "items": [{"item_id": "99999999", "rating": 5}]}', "99999999"),
    ],
)
def test_bad_history_is_one_line(tiny_bank, tmp_path, content, fragment):
    path = tmp_path / "h.json"
    path.write_text(content)
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(path)), fragment)


def test_missing_history_file(tiny_bank, tmp_path):
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(tmp_path / "nope.json")), "nope.json")


def test_help_and_a_bad_history_are_answered_without_loading_torch(tmp_path):
    """`import pmeta` and the CLI load torch, FAISS, transformers and scikit-learn only when a
    command needs them, so `pmeta --help` and a bad input file answer in well under a second."""
    heavy = "print(sorted(m for m in ('torch', 'faiss', 'transformers', 'sklearn') if m in sys.modules))"
    code = f"import sys\nimport pmeta\nfrom pmeta import InvalidHistory, PmetaError, load_config\nload_config('tiny')\nfrom pmeta.text import load_text_config, load_text_history\n{heavy}"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "[]"
    bad = tmp_path / "h.json"
    bad.write_text("{not json")
    code = (
        "import sys\nfrom pmeta.cli import app\n"
        f"for argv in (['--help'], ['adapt', '--bank', {str(tmp_path / 'bank')!r}, '--history', {str(bad)!r}], ['bank', 'build', '--preset', 'nope', '--out', {str(tmp_path / 'b')!r}],\n"
        f"             ['adapt', '--bank', {str(tmp_path / 'bank')!r}, '--history', {str(EXAMPLE)!r}, '--precision', 'fp16'],\n"
        f"             ['bank', 'build', '--format', 'lamp', '--task', 'LaMP-3', '--data', {str(tmp_path)!r}, '--preset', 'nope', '--out', {str(tmp_path / 't')!r}],\n"
        f"             ['bank', 'build', '--format', 'lamp', '--task', 'LaMP-3', '--data', {str(tmp_path / 'none')!r}, '--out', {str(tmp_path / 't')!r}],\n"
        f"             ['eval', 'lamp', '--task', 'LaMP-3', '--data', {str(tmp_path)!r}, '--k-profile', 'x', '--out', {str(tmp_path / 'r')!r}],\n"
        f"             ['eval', 'lamp', '--task', 'LaMP-3', '--data', {str(tmp_path)!r}, '--preset', 'nope', '--out', {str(tmp_path / 'r')!r}]):\n"
        "    try:\n        app(argv, prog_name='pmeta')\n    except SystemExit:\n        pass\n"
        f"{heavy}"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    assert "JSON" in result.stderr and result.stderr.count("unknown preset") == 3
    assert "none is not a folder" in result.stderr and "--k-profile must be" in result.stderr
    assert "precision must be one of float32, bfloat16, got 'fp16'" in result.stderr
    # the library's heavy names still resolve on first use
    code = "import pmeta\nprint(pmeta.Bank.__module__, pmeta.TextBank.__name__, 'build_bank' in dir(pmeta))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split() == ["pmeta.bank.bank", "TextBank", "True"]


def test_version_agrees_with_the_package_metadata():
    import tomllib
    from importlib.metadata import version

    import pmeta as package

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert package.__version__ == declared == version("pmeta")
    result = pmeta("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pmeta {declared}"


def test_not_a_bank_is_one_line(tmp_path):
    assert_one_line_error(pmeta("adapt", "--bank", str(tmp_path), "--history", str(EXAMPLE)), "bank")
    assert list(tmp_path.iterdir()) == []


def test_bank_info_and_verify(tiny_bank):
    info = pmeta("bank", "info", str(tiny_bank), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["active"]
    verify = pmeta("bank", "verify", str(tiny_bank))
    assert verify.returncode == 0, verify.stderr
    assert "ok" in verify.stdout


def test_bad_preset_is_one_line(tmp_path):
    assert_one_line_error(pmeta("bank", "build", "--out", str(tmp_path / "b"), "--preset", "huge"), "preset")


@pytest.mark.parametrize(
    "args, fragment",
    [(["--methods", ","], "names no method"), (["--mode", ","], "no candidate mode"), (["--mode", "auto,full"], "give it alone"), (["--mode", "uni"], "expected one of uni99, pop99, full, or auto alone"), (["--k", "1,1"], "given twice"),
     (["--method-option", "random.bogus=1"], "method 'random' has no option 'bogus'"), (["--method-option", "ease.lam=abc"], "ease.lam='abc'"),
     (["--method-option", "pmeta.steps=2"], "takes no options"), (["--resamples", "1000000"], "resamples must be"), (["--methods", "random,random"], "given twice"),
     (["--transfer-prior", "both"], "--transfer-prior must be one of source, target")],
)  # fmt: skip
def test_bad_eval_requests_fail_before_any_data_or_bank(tmp_path, args, fragment):
    out = tmp_path / "report"
    assert_one_line_error(pmeta("eval", "movielens", "--data", str(tmp_path / "no-such-dir"), "--out", str(out), *args), fragment)
    assert not out.exists()  # checked before the (missing) dataset is read or a bank built


@pytest.mark.parametrize(
    "args, fragment",
    [(["adapt", "--bank", "b", "--history", "h.json", "--top", "0"], "Invalid value for '--top'"),
     (["adapt", "--bank", "b", "--history", "h.json", "--top", "abc"], "Invalid value for '--top'"),
     (["adapt", "--bank", "b", "--history", "h.json", "--steps", "-1"], "Invalid value for '--steps'"),
     (["adapt", "--bank", "b"], "Missing option '--history'"),
     (["adapt", "--bank", "b", "--history", "h.json", "--tpo", "3"], "No such option: --tpo"),
     (["bank", "build", "--out", "b", "--seed", "-1"], "Invalid value for '--seed'"),
     (["bank", "build", "--out", "b", "--anchors", "many"], "Invalid value for '--anchors'"),
     (["eval", "movielens", "--out", "r", "--seed", "-1"], "Invalid value for '--seed'"),
     (["bank", "nosuch"], "No such command 'nosuch'")],
)  # fmt: skip
def test_option_parser_errors_are_one_line_too(tmp_path, args, fragment):
    """Errors the option parser finds (typer's boxed panel by default) follow the same one-line rule."""
    result = pmeta(*args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert "--help" in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [("bank", "build", "--out", "b"), ("eval", "movielens", "--out", "r")])
@pytest.mark.parametrize("format, fragment", [("ml-100k", "--format ml-100k needs --data DIR"), ("ml-99", "Unknown MovieLens format 'ml-99'")])
def test_a_format_other_than_the_samples_needs_data(tmp_path, command, format, fragment):
    """Without --data pmeta reads the shipped ml-latest-small, so any other --format is a mistake,
    refused before a bank is built or a report folder made (it used to be ignored silently)."""
    assert_one_line_error(pmeta(*command, "--format", format, cwd=tmp_path), fragment)
    assert list(tmp_path.iterdir()) == []


def test_no_arguments_print_the_help():
    result = pmeta()
    assert result.returncode == 2 and "Usage" in result.stdout and "bank" in result.stdout and result.stderr == ""


def test_a_closed_output_pipe_ends_quietly(tiny_bank):
    """`pmeta adapt ... | head -1`: the reader goes away; pmeta stops without an error line."""
    proc = subprocess.Popen([sys.executable, "-m", "pmeta", "adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--top", "5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.read(1)  # ~250 KB of lines: more than a pipe holds, so the writer is still writing
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and stderr == "", stderr


def test_an_unusable_out_fails_before_any_data_or_bank(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    base = ("eval", "movielens", "--data", str(tmp_path / "no-such-dir"), "--methods", "popularity")
    assert_one_line_error(pmeta(*base, "--out", str(afile)), "is a file, not a folder")
    assert_one_line_error(pmeta(*base, "--out", str(tmp_path / "x" / "y")), "does not exist")
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("device, fragment", [("foo", "unknown torch device 'foo'"), ("meta", "not supported")])
def test_a_bad_device_fails_before_the_bank_folder_exists(tmp_path, device, fragment):
    out = tmp_path / "bank"
    assert_one_line_error(pmeta("bank", "build", "--preset", "tiny", "--device", device, "--out", str(out)), fragment)
    assert not out.exists()


def test_a_negative_seed_is_a_usage_error(tmp_path):
    result = pmeta("bank", "build", "--preset", "tiny", "--seed", "-1", "--out", str(tmp_path / "bank"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--seed" in result.stderr
    assert not (tmp_path / "bank").exists()


def test_user_option_names_the_user_of_a_file_without_one_and_is_checked_as_the_option(tiny_bank, tmp_path):
    history = tmp_path / "h.json"
    history.write_text(json.dumps({"items": json.loads(EXAMPLE.read_text())["items"]}))
    result = pmeta("adapt", "--bank", str(tiny_bank), "--history", str(history), "--user", "u9", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user_id"] == "u9"
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(history), "--user", "a/b"), "--user: must not be a path")
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(history)), "user_id: this required field is missing")


def test_each_kind_of_bank_opened_as_the_other_is_the_callers_error(tiny_bank):
    from pmeta import Bank, TextBank
    from pmeta.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="is not a text bank"):
        TextBank.open(tiny_bank)
    Bank.open(tiny_bank)  # a ranking bank opens as one


def test_adapt_precision_option(tiny_bank):
    ok = pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--precision", "bfloat16", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["recommendations"]) == 10
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--precision", "fp8"), "precision")


def test_adapt_device_option(tiny_bank):
    """`pmeta adapt --device` serves on that device (tests/test_cuda.py compares cuda with cpu where a
    GPU is lent); an unknown device, or one this machine lacks, is one line."""
    import torch

    ok = pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--device", "cpu", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["recommendations"]) == 10
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--device", "gpu0"), "unknown torch device 'gpu0'")
    missing = f"cuda:{torch.cuda.device_count()}"
    assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), "--device", missing), "not available")


@pytest.mark.parametrize("threads", ["-2", "100000", "2147483648"])
def test_a_thread_count_out_of_range_is_a_usage_error(threads):
    """torch segfaults on 100000 threads and overflows on 2**31: refused by the parser (0 to 1024)."""
    assert_one_line_error(pmeta("--threads", threads, "bank", "info", "nowhere"), "Invalid value for '--threads'")


def test_flags_of_the_other_kind_of_bank_are_refused(tiny_bank, tmp_path):
    """--input / --retrieve belong to text banks: on a ranking bank they used to be ignored (exit 0);
    --preset names a preset even when --bank makes it unused (a typo used to run the whole report)."""
    for flag in (["--input", "hi"], ["--retrieve", "3"]):
        assert_one_line_error(pmeta("adapt", "--bank", str(tiny_bank), "--history", str(EXAMPLE), *flag), f"{flag[0]} applies to text banks")
    out = tmp_path / "report"
    assert_one_line_error(pmeta("eval", "movielens", "--bank", str(tiny_bank), "--preset", "huge", "--out", str(out)), "unknown preset 'huge'")
    assert not out.exists()
    # --transfer-prior target is for a bank on another catalogue: refused in-domain, and without --bank before one is built
    for bank in (["--bank", str(tiny_bank)], []):
        assert_one_line_error(pmeta("eval", "movielens", *bank, "--transfer-prior", "target", "--out", str(out)), "needs a --bank built on another catalogue")
        assert not out.exists()


def test_a_closed_stdout_is_an_error_not_a_silent_success(tiny_bank):
    result = subprocess.run(f'"{sys.executable}" -m pmeta adapt --bank "{tiny_bank}" --history "{EXAMPLE}" >&-', shell=True, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "standard output is closed")


def test_bank_info_refuses_a_bank_whose_active_folder_is_gone(tiny_bank, tmp_path):
    import shutil

    copy = tmp_path / "bank"
    shutil.copytree(tiny_bank, copy)
    active = json.loads(pmeta("bank", "info", str(copy), "--json").stdout)["active"]
    (copy / "versions" / active).chmod(0o755)
    shutil.rmtree(copy / "versions" / active)
    assert_one_line_error(pmeta("bank", "info", str(copy)), f"the folder of the active version {active} is missing")


def test_a_data_warning_is_one_line_before_the_error(tmp_path):
    """A rating of a movie missing from movies.csv is dropped with a warning: one ``pmeta: warning:``
    line (not Python's file:line and source line), then the build's own one-line error."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n2,Jumanji (1995),Adventure\n")
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,5,1\n1,2,5,2\n1,77,5,3\n")
    result = pmeta("bank", "build", "--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "bank"), "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0] == f"pmeta: warning: {data / 'ratings.csv'}: dropped 1 rating(s) of items missing from movies.csv."
    assert lines[1].startswith("pmeta: error:") and "it needs at least 2" in lines[1]
    assert not (tmp_path / "bank").exists()  # the build failed after creating the folder: it is gone

"""`mfa-hf generate`: a bad command line is one line on stderr and exit code 2, found before
transformers is imported; a run prints the prompt, the output and the timings, and --no-progress
leaves stderr empty."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mfa_hf import cli
from mfa_hf.integrations.transformers import generate as gen

ERROR = "mfa-hf generate: error: "


@pytest.fixture
def no_transformers(monkeypatch):
    """`import transformers` raises ImportError for the length of the test, and no transformers module
    may be imported by it."""
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "transformers", None)
    yield
    imported = sorted(name for name in set(sys.modules) - before
                      if name.split(".")[0] == "transformers" and sys.modules[name] is not None)
    assert not imported, f"imported {imported}"


def _main(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(["generate", *argv])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2
    assert err.startswith(ERROR) and err.endswith("\n") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("argv,expected", [
    (["--max-new-tokens", "-1"], ["--max-new-tokens", "expected an integer >= 1, got '-1'"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "got '0'"]),
    (["--max-new-tokens", "many"], ["--max-new-tokens", "got 'many'"]),
    (["--attn", "flash"], ["--attn", "invalid choice: 'flash'"]),
    (["--gguf-file", "m.gguf"], ["--gguf-file needs --model"]),
    (["--kv-cache", "int8", "--attn", "sdpa"], ["--kv-cache int8 needs --attn mps_flash"]),
    (["--prompt-file", "no/such/prompt.txt"], ["--prompt-file no/such/prompt.txt: no such file"]),
    (["--prompt-file", "."], ["--prompt-file .: expected a text file, got a directory"]),
    (["foo"], ["unrecognized arguments: foo", "see mfa-hf generate --help"]),  # was named as the top level's
    (["--model", "./no/such/dir"], ["--model ./no/such/dir: no such directory, and not a hub id"]),
    (["--model", "org/name/extra"], ["not a hub id"]),
    (["--device", "gpu0"], ["--device gpu0: not a torch device"]),
    (["--device", "meta"], ["--device meta: expected one of cpu, mps, cuda", "'meta'"]),  # was a traceback, 20 s in
    (["--device", "xpu"], ["--device xpu: expected one of cpu, mps, cuda", "'xpu'"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value[0].startswith("--") else "")
def test_bad_arguments_fail_in_one_line_before_transformers(capsys, no_transformers, argv, expected):
    _assert_one_line_error(*_main(capsys, *argv), *expected)


def test_model_directories_are_checked(capsys, no_transformers, tmp_path):
    _assert_one_line_error(*_main(capsys, "--model", str(tmp_path)), "has no config.json")
    _assert_one_line_error(*_main(capsys, "--model", str(tmp_path), "--gguf-file", "m.gguf"),
                           "--gguf-file m.gguf: no such file in")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    _assert_one_line_error(*_main(capsys, "--model", str(tmp_path / "m.gguf")), "got a file")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    _assert_one_line_error(*_main(capsys, "--prompt-file", str(empty)), "the file is empty")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    _assert_one_line_error(*_main(capsys, "--prompt-file", str(binary)), "not UTF-8 text")


def test_a_device_this_machine_lacks(capsys, no_transformers):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    _assert_one_line_error(*_main(capsys, "--device", "mps"), "--device mps: this machine has no mps device")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty hub cache and a hub endpoint that refuses connections at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def test_an_unreachable_hub_id_fails_in_one_line(capsys, no_transformers, hub):
    _assert_one_line_error(*_main(capsys, "--model", "someorg/some-model"), "--model someorg/some-model: not a local "
                           "directory, not in the local hub cache, and http://127.0.0.1:9 could not be reached")


def test_offline_mode_is_named(capsys, no_transformers, hub, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    _assert_one_line_error(*_main(capsys, "--model", "someorg/some-model"), "HF_HUB_OFFLINE is set")


def test_an_unreachable_hub_reads_a_cached_model_from_the_cache(capsys, no_transformers, hub, monkeypatch, tmp_path):
    (tmp_path / "hub-cache" / "models--someorg--some-model" / "snapshots" / "abc").mkdir(parents=True)
    seen = {}

    def load(*args, local_files_only):
        seen["local_files_only"] = local_files_only
        raise gen.LoadError("stop here")

    monkeypatch.setattr(gen, "load", load)
    _assert_one_line_error(*_main(capsys, "--model", "someorg/some-model"), "stop here")
    assert seen == {"local_files_only": True}


def _cli(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mfa_hf.cli", "generate", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_the_command_exits_2_without_a_traceback(tmp_path):
    result = _cli("--max-new-tokens", "0", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(ERROR) and result.stderr.count("\n") == 1, result.stderr


def test_help_names_every_default(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["generate", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 128)", "(default: mps_flash)", "(default: none)", "(default: float32)"):
        assert default in text, text


def test_ctrl_c_ends_the_run_in_one_line(capsys, monkeypatch):
    """Ctrl-C while the model loads or decodes: exit 130 (the shell's code for SIGINT), no traceback."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_generate", interrupted)
    code = cli.main(["generate", "--max-new-tokens", "3"])
    assert code == 130
    assert capsys.readouterr().err == "\nmfa-hf generate: interrupted\n"


WORDS = ["[UNK]", "</s>", "a", "short", "story", "about", "the", "sea"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A one-layer Llama with a word-level tokenizer, saved as a local model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "prompt.txt").write_text("a short story about the sea\n")
    return folder


@pytest.mark.parametrize("quiet", [True, False], ids=["no-progress", "progress"])
def test_a_run_prints_the_prompt_then_the_output(tiny_model, quiet):
    argv = ["--model", str(tiny_model), "--prompt-file", str(tiny_model / "prompt.txt"), "--max-new-tokens", "3",
            "--no-chat"] + (["--no-progress"] if quiet else [])
    result = _cli(*argv, cwd=tiny_model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Prompt:\na short story about the sea\n\nOutput:\n"), result.stdout
    assert "attn=mps_flash kv_cache=none" in result.stdout and "decode:" in result.stdout
    # the printed speed may be the platform's own kernel (the native route on CPU): the run says which served
    served = next(line for line in result.stdout.splitlines() if line.startswith("attention served by: "))
    assert "native sdpa-cpu-flash" in served or "mfa-hf torch" in served, served
    if quiet:
        assert result.stderr == ""
    else:  # the bars --no-progress hides are really there
        assert "Loading weights" in result.stderr and "decode" in result.stderr


@pytest.mark.parametrize("what", ["new tokens", "prompt"])
def test_a_run_past_the_models_context_is_a_usage_error(tiny_model, tmp_path, what):
    """The tiny Llama's context is 2048 positions: a prompt past it gave an empty output without a word, and any
    --max-new-tokens was taken (decoding went on past the positions the model was trained for)."""
    prompt = tiny_model / "prompt.txt"
    argv = ["--max-new-tokens", "5000"]
    if what == "prompt":
        prompt = tmp_path / "long.txt"
        prompt.write_text("a short story about the sea " * 400)
        argv = ["--max-new-tokens", "3"]
    result = _cli("--model", str(tiny_model), "--prompt-file", str(prompt), "--no-chat", "--no-progress", *argv,
                  cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    expected = ("--max-new-tokens 5000: expected at most 2042 (the model's context of 2048 tokens"
                if what == "new tokens" else "--prompt-file: expected a prompt shorter than the model's context of 2048")
    assert result.stderr.startswith(ERROR) and expected in result.stderr and result.stderr.count("\n") == 1, \
        result.stderr


def test_a_directory_transformers_cannot_load_fails_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("not json")
    result = _cli("--model", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{ERROR}could not load {tmp_path}: ") and result.stderr.count("\n") == 1


@pytest.mark.slow  # ~40-75 s on 2 shared cores: importing transformers and reading the GGUF file
def test_the_default_model_with_no_progress_prints_only_the_result(tmp_path):
    result = _cli("--max-new-tokens", "4", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Prompt:\nWrite a short story about a lighthouse keeper.\n\nOutput:\n")
    assert "new=4 tok" in result.stdout and "attention served by: " in result.stdout

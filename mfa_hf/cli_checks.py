"""`mfa-hf generate`'s arguments checked before anything heavy is imported or loaded.

A wrong value should cost a second, not the half minute it takes to import transformers and load
a model. Everything here uses the standard library (and torch, already imported with mfa_hf).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


class UsageError(Exception):
    """A bad command line, told as one line; the CLI exits with code 2."""


# Hugging Face repo ids: `name` or `org/name`, word characters, '-' and '.', at most 96 characters.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(name: str) -> bool:
    return (len(name) <= 96 and _HUB_ID.fullmatch(name) is not None and "--" not in name and ".." not in name
            and not name.endswith((".", "-")))


def writable_path(text: str) -> str:
    """argparse type for an output file: its folder must exist (checked before a run of minutes, not after)."""
    import os

    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"expected a file path in an existing folder, got {text!r}")
    return text


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def check_generate_args(args) -> None:
    """Raise UsageError for the first argument that cannot work."""
    if args.gguf_file and args.model is None:
        raise UsageError("--gguf-file needs --model (the directory or hub id holding it)")
    if args.kv_cache != "none" and args.attn != "mps_flash":
        raise UsageError(f"--kv-cache {args.kv_cache} needs --attn mps_flash (the kernel reads the quantized "
                         f"cache), got --attn {args.attn}")
    if args.model is not None:
        _check_model(args.model, args.gguf_file)
    if args.prompt_file is not None:
        _check_prompt_file(args.prompt_file)


def _check_model(model: str, gguf_file: str | None) -> None:
    path = Path(model).expanduser()
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise UsageError(f"--gguf-file {gguf_file}: no such file in {model}")
        if not gguf_file and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise UsageError(f"--model {model}: the directory has no config.json (a GGUF file inside it goes to "
                             "--gguf-file)")
    elif path.is_file():
        raise UsageError(f"--model {model}: expected a directory or a hub id, got a file (for a GGUF file "
                         "pass its directory as --model and its name as --gguf-file)")
    elif not looks_like_hub_id(model):
        raise UsageError(f"--model {model}: no such directory, and not a hub id like org/name")


def _check_prompt_file(name: str) -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        raise UsageError(f"--prompt-file {name}: expected a text file, got a directory")
    if not path.is_file():
        raise UsageError(f"--prompt-file {name}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {name}: not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"--prompt-file {name}: the file is empty")


RUN_DEVICES = ("cpu", "mps", "cuda")


def check_device(requested: str | None) -> str:
    """The device to run on: the requested one if this machine has it, else mps, cuda, cpu."""
    import torch

    if requested is None:
        if torch.backends.mps.is_available():
            return "mps"
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise UsageError(f"--device {requested}: not a torch device (cpu, mps, cuda, cuda:1, ...)") from None
    if kind not in RUN_DEVICES:  # meta holds no values; xpu, hpu, ...: no backend of ours or stock path measured
        raise UsageError(f"--device {requested}: expected one of {', '.join(RUN_DEVICES)} (cuda:1, ...), got device "
                         f"type {kind!r}")
    available = {"mps": torch.backends.mps.is_available, "cuda": torch.cuda.is_available}.get(kind)
    if available is not None and not available():
        raise UsageError(f"--device {requested}: this machine has no {kind} device "
                         "(leave --device out to take the best one present)")
    return requested

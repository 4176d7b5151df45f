"""``skipgpt generate``: text from a dense or routed model (uses the fast path)."""

from __future__ import annotations

from ..errors import SkipGPTError
from .common import (
    add_device_args,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_float,
    positive_int,
    top_p_fraction,
    unit_interval,
)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument(
        "--do-sample",
        action="store_true",
        help="sample (with --temperature, --top-p) instead of greedy decoding",
    )
    p.add_argument("--temperature", type=positive_float, default=0.7, help="with --do-sample: > 0")
    p.add_argument("--top-p", type=top_p_fraction, default=0.9, help="with --do-sample: in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed of --do-sample")
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="routed model: execute iff p(execute) >= θ"
    )
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..loading import load_model

    empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
    if empty:
        raise SkipGPTError(f"--prompt number {empty[0] + 1} is empty; give some text to continue")
    model, tokenizer = load_model(args.model, threshold=args.threshold, **load_options(args))
    prompts = args.prompt
    if args.chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not args.chat)
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    need = enc["input_ids"].shape[1] + args.max_new_tokens
    if limit is not None and need > limit:
        raise SkipGPTError(
            f"the longest prompt ({enc['input_ids'].shape[1]} tokens) plus --max-new-tokens "
            f"{args.max_new_tokens} exceeds the model's {limit} positions; shorten the prompt or ask for fewer tokens"
        )
    torch.manual_seed(args.seed)
    if hasattr(model, "reset_stats"):
        model.reset_stats()
    kwargs = (
        dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.do_sample
        else dict(do_sample=False)
    )
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    result = {"model": args.model, "completions": texts}
    if hasattr(model, "sparsity_stats"):
        result["sparsity"] = {k: v for k, v in model.sparsity_stats().items() if k != "per_layer"}
    emit(args, result, "\n---\n".join(texts))
    return 0

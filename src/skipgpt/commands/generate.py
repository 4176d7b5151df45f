"""``skipgpt generate``: text from a dense or routed model (uses the fast path)."""

from __future__ import annotations

from .common import add_json_arg, add_model_arg, emit, positive_int, unit_interval


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="routed model: execute iff p(execute) >= θ"
    )
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..loading import load_model

    model, tokenizer = load_model(args.model, threshold=args.threshold)
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

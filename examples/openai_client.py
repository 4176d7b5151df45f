"""Talk to `skipgpt serve` with the official `openai` client: a completion, a chat and a stream.

    .venv-serve/bin/skipgpt serve --model runs/demo &          # 127.0.0.1:8000
    .venv-serve/bin/python examples/openai_client.py           # prints the exchange
    .venv-serve/bin/python examples/openai_client.py --record results/serve_transcript.md

The server's model name is what `GET /v1/models` lists (the prepared vLLM folder). With
``--record`` the exchange is also written as markdown (to a temp file, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--record", type=Path, help="also write the exchange to this markdown file")
    p.add_argument("--server-command", help="how the server was started (written into the record)")
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    lines: list[str] = []

    def show(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    model = client.models.list().data[0].id
    show(f"# `openai` {__import__('openai').__version__} client talking to `skipgpt serve` ({args.base_url})")
    show()
    show(
        f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, by `examples/openai_client.py`; greedy decoding (temperature 0)."
    )
    show()
    if args.server_command:
        show(f"Server: `{args.server_command}`")
        show()
    show(f"`client.models.list()` -> `{model}`")
    show()

    prompt = "The capital of France is"
    t = time.perf_counter()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
    show("## Completion")
    show(
        f"request: `client.completions.create(prompt={prompt!r}, max_tokens={args.max_tokens}, temperature=0)`"
    )
    show()
    show(
        f"response ({time.perf_counter() - t:.2f} s, finish_reason={r.choices[0].finish_reason!r}, "
        f"usage={json.dumps(r.usage.model_dump())}):"
    )
    show("```")
    show(prompt + r.choices[0].text)
    show("```")

    messages = [{"role": "user", "content": "Give me one tip for writing clear code."}]
    t = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    show("## Chat")
    show(
        f"request: `client.chat.completions.create(messages={json.dumps(messages)}, max_tokens={args.max_tokens}, temperature=0)`"
    )
    show()
    show(f"response ({time.perf_counter() - t:.2f} s, finish_reason={r.choices[0].finish_reason!r}):")
    show("```")
    show(f"{r.choices[0].message.role}: {r.choices[0].message.content}")
    show("```")

    prompt = "Once upon a time"
    t = time.perf_counter()
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    chunks, first = [], None
    for event in stream:
        if first is None:
            first = time.perf_counter() - t
        chunks.append(event.choices[0].text)
    show("## Streaming")
    show(
        f"request: `client.completions.create(prompt={prompt!r}, max_tokens={args.max_tokens}, temperature=0, stream=True)`"
    )
    show()
    show(
        f"{len(chunks)} chunks, first after {first:.2f} s, last after {time.perf_counter() - t:.2f} s; "
        f"the chunks as received (joined by `|`):"
    )
    show("```")
    show("|".join(chunks))
    show("```")

    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.record.parent, prefix=f".{args.record.name}.")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

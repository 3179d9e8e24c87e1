"""Tokens/s of a running server for 1 request and for N concurrent ones, median of several rounds.

python bench/http_throughput.py --url http://127.0.0.1:8000 --concurrency 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

QUESTIONS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "Describe the water cycle in detail.",
    "What should I pack for a week of hiking?",
]


async def one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> int:
    reply = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


async def round_(client: httpx.AsyncClient, model: str, concurrency: int, max_tokens: int) -> float:
    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(client, model, i, max_tokens) for i in range(concurrency)))
    return sum(tokens) / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="model field; default the first listed model")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests in the second case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case; the median is reported")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    args = parser.parse_args()
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        await round_(client, model, 1, 8)  # warm-up
        print("| concurrent requests | tokens/s (median) | rounds |")
        print("| --- | --- | --- |")
        for concurrency in (1, args.concurrency):
            rates = [await round_(client, model, concurrency, args.max_tokens) for _ in range(args.rounds)]
            print(
                f"| {concurrency} | {statistics.median(rates):.1f} | {', '.join(f'{r:.1f}' for r in rates)} |"
            )


if __name__ == "__main__":
    asyncio.run(main())

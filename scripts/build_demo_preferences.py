"""Build the bundled demonstration preference set (assets/demo_preferences.jsonl).

    python scripts/build_demo_preferences.py [--pairs 400] [--out FILE]

Each pair is a question from the packaged chatterbot corpus (short English Q&A), with the
corpus's human answer as ``chosen`` and the bundled model's own greedy reply as ``rejected``:
preference data that needs no network and no rating by hand, so the whole cycle (judge, export,
``make dpo``, chat with the result) runs on a fresh machine. The file in the repository was
made by this script; running it again gives the same file.

A reply that reached the token limit is cut back to its last whole sentence (and left out if
it has none, or if the cut leaves a code block open): otherwise most rejected replies would
end mid-word, and DPO would learn to prefer replies that are not cut off, which says nothing
about the replies a user sees. What the set still teaches is the corpus's short, direct
answers over the model's longer ones.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bootstrap  # noqa: F401
from tqdm.auto import tqdm

from src.chat.preferences import PreferencePair
from src.config import REPO_ROOT, load_settings
from src.errors import MiniClaudeError
from src.files import write_text_atomically
from src.params import GenerationParams
from src.stack import build_chat_stack
from src.training.data import read_chatterbot

DEMO_FILE = REPO_ROOT / "assets" / "demo_preferences.jsonl"
REPLY_TOKENS = 64
SEED = 7
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def whole_sentences(text: str) -> str | None:
    """``text`` up to the end of its last whole sentence; None if it has none or the cut
    leaves a code block open."""
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    if not ends:
        return None
    kept = text[: ends[-1]].strip()
    return kept if kept.count("```") % 2 == 0 else None


def questions(count: int) -> list[tuple[str, str]]:
    """(question, human answer) pairs: each dialog's first exchange, shuffled reproducibly."""
    seen, pairs = set(), []
    for example in read_chatterbot():
        question, answer = (m["content"] for m in example.messages[:2])
        if question.lower() not in seen:
            seen.add(question.lower())
            pairs.append((question, answer))
    random.Random(SEED).shuffle(pairs)
    return pairs[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--out", type=Path, default=DEMO_FILE)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(_env_file=None, model_name="smollm2-135m-instruct")
        stack = build_chat_stack(settings)
    except MiniClaudeError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    service = stack.service
    greedy = GenerationParams(do_sample=False, temperature=0.0, max_new_tokens=REPLY_TOKENS)

    def reply(question: str) -> str | None:
        result = service.reply(service.new_conversation(), question, greedy)
        text = result.text.strip()
        return whole_sentences(text) if result.finish_reason == "length" else text

    chosen = questions(args.pairs)
    try:
        with ThreadPoolExecutor(settings.max_batch_size) as pool:  # replies batched together
            replies = list(
                tqdm(pool.map(reply, [q for q, _ in chosen]), total=len(chosen), desc="replies")
            )
    finally:
        stack.close()
    lines, left_out = [], 0
    for (question, answer), model_reply in zip(chosen, replies, strict=True):
        if model_reply and model_reply.lower() != answer.lower():
            pair = PreferencePair([{"role": "user", "content": question}], answer, model_reply)
            lines.append(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
        else:
            left_out += 1
    write_text_atomically(args.out, "".join(lines))
    print(
        f"{len(lines)} pairs written to {args.out}; {left_out} questions left out (a reply "
        "cut off with no whole sentence, or the same as the human answer)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

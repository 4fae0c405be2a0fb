"""A mobile/embedded app's backend embedding tqedge in-process: one chat per user conversation.

The app (an Android UI talking to Termux or Chaquopy, a kiosk on a Pi, a bot) sends lines of
JSON on stdin and reads one line of JSON per reply on stdout::

    {"conversation": "alice", "message": "Hi! What is a Raspberry Pi?"}
    → {"conversation": "alice", "reply": "...", "tokens": 41, "tokens_per_s": 9.8, "kv_bytes": 8388608}

Memory: one model (weights loaded once) and one KV cache per *live* conversation, each a
fixed ``--kv-budget``, so the process needs weights + runtime + ``--max-live`` × budget;
``tqedge plan --model BUNDLE --memory <device RAM>`` says how that splits on your device.
When more conversations are live than ``--max-live``, the least recently used one is parked.

Parking: once the runtime has compressed-session save/restore (``chat.save(path)`` and
``model.chat_from(path)``, planned), a parked conversation is written to ``--sessions`` and
resumed from disk with its cache — that is :meth:`Conversations._park` / ``_open``, one line
each, and they switch on by themselves when the API exists. Until then a parked conversation
starts over (its history is dropped) and a log line says so.

Run::

    python app_backend.py smollm2-fp32.tqe --kv-budget 32MiB --max-live 4 < requests.jsonl
    python app_backend.py smollm2-fp32.tqe --demo     # two interleaved conversations
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path

import tqedge

log = logging.getLogger("app_backend")

SYSTEM = "You are a helpful assistant on a small device. Answer briefly."


class Conversations:
    """Live chats by conversation id, least recently used parked beyond ``max_live``.

    Args:
        model: a loaded model (``tqedge.load``), shared by every conversation.
        kv_budget: KV-cache budget of each conversation ("32MiB").
        max_live: conversations kept in memory at once.
        sessions: directory for parked conversations.
        **sampling: defaults for every reply (``max_tokens``, ``temperature``, ...).
    """

    def __init__(self, model, kv_budget: str, max_live: int, sessions: Path, **sampling):
        self.model, self.kv_budget, self.max_live = model, kv_budget, max_live
        self.sessions = Path(sessions)
        self.sessions.mkdir(parents=True, exist_ok=True)
        self.sampling = sampling
        self.live: OrderedDict[str, object] = OrderedDict()

    def reply(self, conversation: str, message: str) -> dict:
        """The assistant's reply to ``message`` in ``conversation``, with its statistics."""
        chat = self._get(conversation)
        t0 = time.perf_counter()
        text = chat.send(message, **self.sampling)
        seconds = time.perf_counter() - t0
        stats = chat.stats  # GenerationStats of this turn
        return {"conversation": conversation, "reply": text, "tokens": stats.generation_tokens,
                "tokens_per_s": round(stats.decode_tps, 2), "seconds": round(seconds, 2),
                "kv_tokens": stats.kv_tokens, "kv_bytes": chat.cache.nbytes}

    def _get(self, conversation: str):
        if conversation in self.live:
            self.live.move_to_end(conversation)
            return self.live[conversation]
        while len(self.live) >= self.max_live:
            old, chat = self.live.popitem(last=False)
            self._park(old, chat)
        chat = self.live[conversation] = self._open(conversation)
        return chat

    def _path(self, conversation: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in conversation)[:64]
        return self.sessions / f"{safe}.tqs"

    def _open(self, conversation: str):
        path = self._path(conversation)
        if path.exists() and hasattr(self.model, "chat_from"):
            return self.model.chat_from(path, kv_budget=self.kv_budget)  # resume with its compressed cache
        return self.model.chat(system=SYSTEM, kv_budget=self.kv_budget)

    def _park(self, conversation: str, chat) -> None:
        if hasattr(chat, "save"):
            chat.save(self._path(conversation))  # compressed cache + messages to disk
        else:
            log.warning("conversation %r parked without save/restore (not in this tqedge yet): "
                        "it will start over", conversation)


def serve_lines(conversations: Conversations, lines, out) -> None:
    """Answer JSON-lines requests from ``lines``, one JSON line per reply on ``out``."""
    for line in lines:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            result = conversations.reply(str(req["conversation"]), str(req["message"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            result = {"error": f"bad request: {e}"}
        except tqedge.TqedgeError as e:
            result = {"error": str(e)}
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()


DEMO = [("alice", "Hi! My name is Alice. What is a Raspberry Pi?"),
        ("bob", "Give me one tip for saving battery on a phone."),
        ("alice", "What is my name?"),
        ("bob", "And one more tip?")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--kv-budget", default="32MiB", help="KV budget per live conversation")
    ap.add_argument("--max-live", type=int, default=4, help="conversations in memory at once")
    ap.add_argument("--sessions", default="sessions", help="directory for parked conversations")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--demo", action="store_true", help="run two interleaved demo conversations")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    model = tqedge.load(args.bundle, verify="size")
    conv = Conversations(model, args.kv_budget, args.max_live, Path(args.sessions),
                         max_tokens=args.max_tokens, temperature=args.temperature)
    if args.demo:
        lines = [json.dumps({"conversation": c, "message": m}) for c, m in DEMO]
        serve_lines(conv, lines, sys.stdout)
    else:
        serve_lines(conv, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()

"""More of the load test's request kinds: Anthropic's and Ollama's APIs, and judging a reply of
the client's session (a rating, an edit, or another candidate chosen in its place), which the
session check at the end then expects to find."""

from __future__ import annotations

from typing import Any


class OtherRoutes:
    """Mixed into ``LoadClient`` (``src/benchmarks/load.py``), whose helpers it uses."""

    model_name: str | None = None  # the served model, as Ollama's API wants it named

    def anthropic(self, started: float, first: list[float]) -> str:
        body = {
            "model": "any",
            "max_tokens": self.config.max_new_tokens,
            "messages": [{"role": "user", "content": self.prompt()}],
        }
        reply = self.post_json("/v1/messages", body)
        text = reply["content"][0]["text"] if reply.get("content") else ""
        if not isinstance(text, str) or reply.get("stop_reason") not in ("end_turn", "max_tokens"):
            raise self.failed(f"not a Messages reply: {str(reply)[:200]}")
        return "served"

    def ollama(self, started: float, first: list[float]) -> str:
        if self.model_name is None:
            response = self.http.get("/v1/models")
            self.check(response)
            self.model_name = response.json()["data"][0]["id"]
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": self.prompt()}],
            "stream": False,
            "options": {"num_predict": self.config.max_new_tokens},
        }
        reply = self.post_json("/api/chat", body)
        if not reply.get("done") or not isinstance(reply["message"]["content"], str):
            raise self.failed(f"not an Ollama reply: {str(reply)[:200]}")
        return "served"

    def feedback(self, started: float, first: list[float]) -> str:
        """Judge the last reply of the client's session: half the time a rating, else an edit
        or a sampled candidate chosen instead (both change what the session must hold)."""
        session = self.state.session
        if session is None or not session.messages:
            return self.chat(started, first)  # nothing to judge yet: start a session
        rng, index = self.state.rng, len(session.messages) - 1
        route = f"/sessions/{session.session_id}"
        try:
            draw = rng.random()
            if draw < 0.5:
                rating = {"message_index": index, "rating": rng.choice(["good", "bad"])}
                self.post_json(route + "/feedback", rating)
                return "served"
            if draw < 0.75:
                text = f"An edited reply (#{rng.randrange(10**6)})"
                self.post_json(route + "/feedback", {"message_index": index, "edit": text})
            else:
                candidate = self.post_json(route + "/candidates", self.sampled())
                choice = {"message_index": index, "chosen_candidate": candidate["candidate_id"]}
                self.post_json(route + "/feedback", choice)
                text = candidate["content"]
        except Exception:
            # Whether the change was saved is unknown (say, the server was killed meanwhile):
            # the session can no longer be checked word for word.
            self.state.sessions.remove(session)
            self.state.session = None
            raise
        session.messages[index] = {"role": "assistant", "content": text}
        return "served"

    def sampled(self) -> dict[str, Any]:
        seed = self.state.rng.randrange(2**31)
        return {"max_new_tokens": self.config.max_new_tokens, "do_sample": True, "seed": seed}

"""Reflection backends: who writes GEPA's next template. Small, swappable, chosen in the config.

- :class:`TeacherReflection` (*Teacher-Ref*): any OpenAI-compatible chat-completions endpoint (the paper used
  Kimi-K2), with a timeout, retries and clear errors for an endpoint that is down or answers garbage.
- :class:`SelfReflection` (*Self-Ref*): the frozen reference model (the initial weights) writes the template from
  GEPA's default meta-prompt. Not the training policy: the paper found its templates lose diversity late in training.
- :class:`OfflineProposer`: for the embedded world, which has no model that can write English. It edits the parent
  template by word mutations over a vocabulary, more boldly when the parent failed its whole minibatch, and lets
  GEPA's Pareto selection and strict-improvement acceptance do the climbing. It is never shown an answer or the
  phrase warm-up taught.

The two LM backends are plugged in as gepa's ``reflection_lm`` (gepa renders its meta-prompt and parses the
template out of the reply); the offline one as gepa's ``custom_candidate_proposer``. Each says which via
:meth:`gepa_kwargs`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

COMPONENT = "template"
log = logging.getLogger(__name__)


class ReflectionError(RuntimeError):
    """The reflection backend cannot produce a template (endpoint down, garbage reply, ...)."""


class TeacherReflection:
    """A chat model behind an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: the model name the endpoint serves.
        api_key_env: environment variable holding the API key (unset: no Authorization header).
        timeout: seconds per request.
        max_retries: further attempts after a timeout, a connection error or a 5xx / 429 reply.
        temperature: sampling temperature of the reflection.
        max_tokens: reply length limit.
        max_consecutive_failures: a search stops early (keeping what it found) after this many failed reflections in
            a row; a single failure only skips its proposal. Failures are counted in ``failures``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 2,
        temperature: float = 1.0,
        max_tokens: int = 4096,
        max_consecutive_failures: int = 3,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"reflection base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_consecutive_failures = max_consecutive_failures
        self.failures = 0  # reflections that failed (garbage, HTTP errors, timeouts after the retries)
        self.failures_in_a_row = 0

    def gepa_kwargs(self) -> dict[str, Any]:
        self.failures_in_a_row = 0  # called once per search: each search gives the teacher a fresh chance
        return {"reflection_lm": self, "stop_callbacks": self.is_down}

    def is_down(self, gepa_state: Any = None) -> bool:
        """The stop condition handed to gepa: the last ``max_consecutive_failures`` reflections all failed."""
        return self.failures_in_a_row >= self.max_consecutive_failures

    def bind(self, module) -> None:
        """Nothing to bind: the teacher is outside the trainer."""

    def check(self) -> None:
        """Fail early, before training, when the endpoint is unreachable or does not speak the protocol."""
        self.chat([{"role": "user", "content": "Reply with the word ok."}], max_tokens=4)

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        """One reflection. A failure is counted, logged the first time, and raised: gepa skips that proposal."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            reply = self.chat(messages)
        except ReflectionError as err:
            self.failures += 1
            self.failures_in_a_row += 1
            if self.failures == 1:
                log.warning(f"{err}; this proposal is skipped, the search goes on (further failures only counted)")
            if self.failures_in_a_row == self.max_consecutive_failures:
                log.warning(f"{self.failures_in_a_row} reflections in a row failed: this search stops with what it has")
            raise
        self.failures_in_a_row = 0
        return reply

    def chat(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": max_tokens or self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}: {err.read()[:200]!r}"
                if err.code == 429 or err.code >= 500:
                    continue
                raise ReflectionError(f"reflection endpoint {self.url} refused the request ({last_error})") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            return _chat_content(raw, self.url)
        raise ReflectionError(
            f"reflection endpoint {self.url} is unreachable after {self.max_retries + 1} attempts ({last_error})"
        )


def _chat_content(raw: bytes, url: str) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ReflectionError(f"reflection endpoint {url} answered garbage: {raw[:200]!r}") from err
    if not isinstance(content, str) or not content.strip():
        raise ReflectionError(f"reflection endpoint {url} answered an empty or non-text message: {raw[:200]!r}")
    return content


class SelfReflection:
    """The frozen reference model writes the next template (sampled, chat template when it has one).

    Args:
        max_new_tokens: reply length limit.
        temperature: sampling temperature (0: greedy).
    """

    def __init__(self, max_new_tokens: int = 1024, temperature: float = 0.7) -> None:
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.module = None

    def gepa_kwargs(self) -> dict[str, Any]:
        return {"reflection_lm": self}

    def bind(self, module) -> None:
        self.module = module

    def check(self) -> None:
        """Nothing to reach: the reference model is loaded with the policy."""

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        if self.module is None:
            raise ReflectionError("SelfReflection is not bound to a module (the callback binds it at fit start)")
        import torch

        from p2o_lightning.rollout import HFRolloutEngine, SamplingParams

        text = prompt if isinstance(prompt, str) else "\n\n".join(str(m.get("content", "")) for m in prompt)
        engine = HFRolloutEngine(self.module.reference.lm, self.module.tokenizer)
        with torch.random.fork_rng(devices=[]):
            rollouts = engine.generate([text], SamplingParams(1, self.temperature, 1.0, self.max_new_tokens))
        return rollouts.texts[0]


class OfflineProposer:
    """Word-level mutation of the parent template over a vocabulary, guided by the minibatch's feedback.

    Args:
        vocabulary: the words to build templates from (None: the embedded world's ``INSTRUCTION_VOCABULARY``).
        max_words: longest template, in words.
        seed: seed of the mutations.
    """

    def __init__(self, vocabulary: Sequence[str] | None = None, max_words: int = 8, seed: int = 0) -> None:
        if vocabulary is None:
            from p2o_lightning.tasks.addition import INSTRUCTION_VOCABULARY

            vocabulary = INSTRUCTION_VOCABULARY
        self.vocabulary = [w for w in dict.fromkeys(str(v).strip().lower() for v in vocabulary) if w]
        if not self.vocabulary:
            raise ValueError("OfflineProposer needs a non-empty vocabulary")
        self.max_words = max_words
        self.rng = random.Random(seed)

    def gepa_kwargs(self) -> dict[str, Any]:
        return {"custom_candidate_proposer": self}

    def bind(self, module) -> None:
        """Nothing to bind."""

    def check(self) -> None:
        """Nothing to reach."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def __call__(
        self,
        candidate: dict[str, str],
        reflective_dataset: Mapping[str, Sequence[Mapping[str, Any]]],
        components_to_update: list[str],
    ) -> dict[str, str]:
        out = {}
        for name in components_to_update:
            records = reflective_dataset.get(name, [])
            solved = sum(float(r.get("Score", 0.0)) > 0 for r in records)
            # nothing solved: explore with several edits; something solved: refine with one
            edits = 1 if solved else self.rng.randint(1, 3)
            out[name] = self.mutate(candidate.get(name, ""), edits)
        return out

    def mutate(self, template: str, edits: int) -> str:
        words = re.findall(r"[a-z']+", template.lower())
        for _ in range(edits):
            ops = ["insert"] if not words else ["insert", "delete", "replace", "swap"]
            if len(words) >= self.max_words:
                ops = [op for op in ops if op != "insert"]
            op = self.rng.choice(ops)
            if op == "insert":
                words.insert(self.rng.randint(0, len(words)), self.rng.choice(self.vocabulary))
            elif op == "delete":
                words.pop(self.rng.randrange(len(words)))
            elif op == "replace":
                words[self.rng.randrange(len(words))] = self.rng.choice(self.vocabulary)
            elif len(words) > 1:
                i, j = self.rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
        if not words:
            words = [self.rng.choice(self.vocabulary)]
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."

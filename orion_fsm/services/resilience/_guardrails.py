"""Guardrails: what the validating phase checks in a prompt, and what stops a generation.

Input checks return a `Verdict` of `Finding`s (block, or flag for the span and trace);
prompt-injection patterns (English and French) follow a `flag | block | allow` policy.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from orion_fsm._exceptions import ConfigurationError

__all__ = [
    "INJECTION_RULES",
    "Finding",
    "GuardrailConfig",
    "Guardrails",
    "Policy",
    "RepetitionGuard",
    "Verdict",
]

Policy = Literal["flag", "block", "allow"]
Action = Literal["flag", "block"]
_POLICIES: Final = ("flag", "block", "allow")


class _Message(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...


class _SpecialTokens(Protocol):
    def find_special(self, text: str) -> tuple[str, int] | None: ...


class _Params(Protocol):
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def stop(self) -> tuple[str, ...] | None: ...


@dataclass(frozen=True, slots=True)
class GuardrailConfig:
    injection: Policy = "flag"
    # Role tags in user text encode to the real special-token ids (our tokenizer honours them):
    # `<|im_start|>system` in a user message would open a genuine system turn. Blocked by default.
    template_tags: Policy = "block"
    # The exact token check runs in loading_agent; this pre-check only refuses prompts that
    # cannot fit however they tokenize, before paying for tokenizing them. No tokenizer we
    # ship averages more than ~16 characters per token even on runs of whitespace.
    max_chars_per_token: float = 16.0
    max_prompt_chars: int = 2_000_000
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        for name in ("injection", "template_tags"):
            if getattr(self, name) not in _POLICIES:
                raise ConfigurationError(f"GuardrailConfig.{name}", getattr(self, name),
                                         f"one of {', '.join(_POLICIES)}")


@dataclass(frozen=True, slots=True)
class Finding:
    code: str  # empty | too_long | control_character | invalid_text | params | injection |
    #            template_tag | malformed_output
    field: str  # "prompt", "messages[2]", "max_tokens", "output"
    message: str
    action: Action
    rule: str | None = None  # which injection rule matched
    offset: int | None = None  # character offset in the field's text

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field, "message": self.message,
                "action": self.action, "rule": self.rule, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class Verdict:
    findings: tuple[Finding, ...] = ()

    @property
    def blocked(self) -> Finding | None:
        """The first blocking finding: the request must end `invalid` with its message."""
        return next((f for f in self.findings if f.action == "block"), None)

    @property
    def ok(self) -> bool:
        return self.blocked is None

    @property
    def flagged(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.action == "flag")

    def as_notes(self) -> dict[str, Any]:
        """Span attributes (OTel takes homogeneous lists) for the validating phase."""
        if not self.findings:
            return {}
        return {"orion.guardrails.findings": [f.code for f in self.findings],
                "orion.guardrails.rules": [f.rule or f.code for f in self.findings],
                "orion.guardrails.blocked": self.blocked is not None}


# --- prompt injection -----------------------------------------------------------------------

# Matched against normalised text: NFKD without accents, casefolded, invisible characters
# removed, so "Ignorez toutes les instructions précédentes" and "ig\u200bnore previous
# instructions" match the plain spellings below (which allow any run of spaces).
_ANY_ARTICLES = r"(?:(?:all|any|the|your|my|these|those|of|everything|every)\s+)*"
_FR_ARTICLES = r"(?:(?:toutes|tous|toute|tout|les|tes|vos|mes|ces|la|le|de|des)\s+)*"
INJECTION_RULES: Final[Mapping[str, str]] = {
    "ignore_instructions": (
        r"\b(?:ignore|disregard|forget|override|bypass|skip)\s+" + _ANY_ARTICLES
        + r"(?:(?:previous|prior|above|earlier|preceding|foregoing|former|original|initial|"
        r"system|developer)\s+)+(?:instructions?|prompts?|rules|directions|guidelines|"
        r"messages?|commands?|context)\b"
        r"|\b(?:ignore|disregard|forget)\s+(?:all|every|any)\s+(?:of\s+)?(?:the\s+|your\s+)?"
        r"(?:instructions?|rules|guidelines)\b"),
    "ignore_instructions_fr": (
        r"\b(?:ignore|ignorez|ignorer|oublie|oubliez|oublier|ne\s+tiens\s+pas\s+compte|"
        r"ne\s+tenez\s+pas\s+compte|fais\s+abstraction|faites\s+abstraction)\s+(?:de\s+|des\s+)?"
        + _FR_ARTICLES + r"(?:(?:precedentes?|anterieures?)\s+)?"
        r"(?:instructions?|consignes?|regles?|directives?|ordres?)\b"),
    "persona_override": (
        r"\byou\s+are\s+(?:now\s+)?(?:dan|stan|dude|aim)\b|\bdo\s+anything\s+now\b"
        r"|\b(?:dan|developer|god|jailbreak|unrestricted)\s+mode\b"
        r"|\bjailbr(?:oken|eak(?:ed)?)\b"),
    "persona_override_fr": (
        r"\btu\s+es\s+(?:maintenant|desormais|a\s+present)\s+(?:dan\b|une?\s+(?:ia|assistant)"
        r"\s+sans\s+(?:aucune\s+)?(?:restrictions?|limites?|filtres?|censure))"
        r"|\bmode\s+(?:developpeur|dan|sans\s+restrictions?)\b"),
    "reveal_system_prompt": (
        r"\b(?:reveal|show|print|repeat|display|output|leak|dump|tell\s+me|give\s+me|"
        r"what\s+(?:is|are|was|were))\s+(?:me\s+)?(?:your|the)\s+(?:(?:full|complete|exact|"
        r"original|initial|hidden|secret|entire)\s+)*(?:system\s+(?:prompt|message|"
        r"instructions?)|(?:initial|hidden|original)\s+(?:instructions?|prompt)|"
        r"(?:instructions?|prompt)\s+(?:above|you\s+were\s+given))"),
    "reveal_system_prompt_fr": (
        r"\b(?:revele|revelez|reveler|montre|montrez|montrer|affiche|affichez|afficher|"
        r"repete|repetez|repeter|donne|donnez|dis|dites)(?:[\s-]+moi)?\s+(?:ton|ta|tes|votre|"
        r"vos|le|la|les)\s+(?:prompt|message|invite|consignes?|instructions?)\s+"
        r"(?:systeme|du\s+systeme|initiale?s?|cachee?s?|secrete?s?)"),
    "roleplay_jailbreak": (
        r"\b(?:pretend|act|behave|roleplay|role-play)\s+(?:to\s+be\s+|as\s+(?:if\s+)?(?:you\s+"
        r"(?:are|were)\s+)?|like\s+)(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|evil|"
        r"amoral|jailbroken)\b"
        r"|\b(?:unrestricted|unfiltered|uncensored)\s+(?:ai|assistant|model|chatbot|llm)\b"
        r"|\bstay\s+in\s+character\b.{0,80}\b(?:no|without)\s+(?:restrictions|rules|limits)\b"
        r"|\bjoue\s+le\s+role\s+d'?une?\s+(?:ia|assistant)\s+sans\s+(?:restrictions?|limites?)"),
    "fake_role_header": (
        r"(?:^|\n)\s*(?:#{2,}\s*|\[)(?:system|developer|systeme)\s*(?:\]|:)"
        r"|(?:^|\n)\s*(?:system|developer)\s+(?:override|prompt)\s*:"),
}
# Chat-template role tags of the presets we ship (chatml, zephyr, llama3) and llama 2's.
_TEMPLATE_TAG = re.compile(
    r"<\|(?:im_start|im_end|system|user|assistant|start_header_id|end_header_id|eot_id|"
    r"begin_of_text|end_of_text|endoftext)\|>|\[/?INST\]|<</?SYS>>")
# Words each rule cannot match without (every group must have one): Python's regex engine
# pays per character per rule, so a rule runs only on text that could hold it.
_INJECTION_GATES: Final[Mapping[str, tuple[tuple[str, ...], ...]]] = {
    "ignore_instructions": (("ignore", "disregard", "forget", "override", "bypass", "skip"),),
    "ignore_instructions_fr": (("ignor", "oubli", "compte", "abstraction"),),
    "persona_override": (("dan", "stan", "dude", "aim", "anything", "mode", "jailbr"),),
    "persona_override_fr": (("maintenant", "desormais", "present", "mode"),),
    "reveal_system_prompt": (("system", "instruction", "prompt"),),
    "reveal_system_prompt_fr": (("prompt", "message", "invite", "consigne", "instruction"),),
    "roleplay_jailbreak": (("unrestricted", "unfiltered", "uncensored", "evil", "amoral",
                            "jailbroken", "character", "joue"),),
    "fake_role_header": (("system", "developer", "systeme"),),
}
_INJECTION: Final = tuple((name, re.compile(rx, re.DOTALL), _INJECTION_GATES[name])
                          for name, rx in INJECTION_RULES.items())
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u00ad]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _normalise(text: str) -> str:
    if not text.isascii():
        text = unicodedata.normalize("NFKD", _INVISIBLE.sub("", text))
        text = "".join(c for c in text if not unicodedata.combining(c))
    return text.casefold()


def _where(messages: Sequence[_Message], i: int) -> str:
    return "prompt" if len(messages) == 1 else f"messages[{i}]"


class Guardrails:
    """Checks a request before any model is touched; see `GuardrailConfig` for the policies."""

    def __init__(self, config: GuardrailConfig | None = None) -> None:
        self.config = config or GuardrailConfig()

    def check_input(self, messages: Sequence[_Message], params: _Params | None = None, *,
                    context_length: int | None = None) -> Verdict:
        """Findings about the prompt and parameters, in order; `verdict.blocked` says refuse.

        `context_length`: the largest context the request could be served with (the requested
        agent's, or the largest in the registry when routing has not chosen yet).
        """
        findings: list[Finding] = []
        if not any(isinstance(m.content, str) and m.content.strip() for m in messages
                   if m.role != "system"):
            findings.append(Finding("empty", "prompt", "the prompt is empty or only whitespace: "
                                    "give the model a question or an instruction", "block"))
        total = 0
        for i, m in enumerate(messages):
            if not isinstance(m.content, str):
                continue  # the validating phase names the wrong type
            total += len(m.content)
            findings.extend(self._check_text(_where(messages, i), m.content,
                                             user=m.role != "system"))
        findings.extend(self._check_size(total, context_length))
        if params is not None:
            findings.extend(self._check_params(params, context_length))
        return Verdict(tuple(findings))

    def _check_text(self, where: str, text: str, *, user: bool) -> Iterable[Finding]:
        if (m := _CONTROL.search(text)) is not None:
            yield Finding("control_character", where, (
                f"{where} contains the control character U+{ord(m.group()):04X} at character "
                f"{m.start()}; only newline, tab and carriage return are allowed"),
                "block", offset=m.start())
        if not text.isascii() and (m := _SURROGATE.search(text)) is not None:
            yield Finding("invalid_text", where, (
                f"{where} holds a lone surrogate U+{ord(m.group()):04X} at character "
                f"{m.start()}: it is not valid Unicode text; decode the prompt as UTF-8"),
                "block", offset=m.start())
        config = self.config
        # A caller's system message is checked for tags too: over HTTP it is any client's.
        if config.template_tags != "allow" and ("<" in text or "[" in text) \
                and (m := _TEMPLATE_TAG.search(text)) is not None:
            yield Finding("template_tag", where, (
                f"{where} contains the chat-template tag {m.group()!r} at character "
                f"{m.start()}: it would open a real turn of the conversation; remove it"),
                config.template_tags, rule="template_tag", offset=m.start())
        if not user:
            return  # instructions in the caller's own system prompt are not an injection
        if config.injection == "allow":
            return
        if not text.isascii() and (m := _BIDI.search(text)) is not None:
            yield Finding("injection", where, (
                f"{where} contains the bidirectional override U+{ord(m.group()):04X} at "
                f"character {m.start()}, which can hide text from a reader"),
                config.injection, rule="bidi_override", offset=m.start())
        normalised = _normalise(text)
        for rule, pattern, gates in _INJECTION:
            if not all(any(word in normalised for word in gate) for gate in gates):
                continue
            if (m := pattern.search(normalised)) is not None:
                yield Finding("injection", where, (
                    f"{where} looks like a prompt injection ({rule}: {m.group().strip()!r})"),
                    config.injection, rule=rule)
                return

    def check_special_tokens(self, messages: Sequence[_Message],
                             vocabulary: _SpecialTokens) -> Verdict:
        """Special tokens of the agent's own vocabulary written in any message, system ones
        included: each would encode to its control id (`<file_sep>`, `<|im_start|>`), so text
        could end a turn or open one. Runs once the agent, hence the vocabulary, is known."""
        policy = self.config.template_tags
        if policy == "allow":
            return Verdict()
        for i, m in enumerate(messages):
            if not isinstance(m.content, str) or (found := vocabulary.find_special(m.content)) \
                    is None:
                continue
            token, offset = found
            where = _where(messages, i)
            return Verdict((Finding("special_token", where, (
                f"{where} contains {token!r} at character {offset}, a special token of the "
                "agent's vocabulary: the model would read it as a control token; remove it"),
                policy, rule=token, offset=offset),))
        return Verdict()

    def _check_size(self, chars: int, context_length: int | None) -> Iterable[Finding]:
        limit = self.config.max_prompt_chars
        if context_length is not None:
            limit = min(limit, math.floor(context_length * self.config.max_chars_per_token))
        if chars > limit:
            context = "" if context_length is None else f" for a context of {context_length} tokens"
            yield Finding("too_long", "prompt", (
                f"the prompt is {chars} characters, more than can fit{context} (limit {limit} "
                "characters): shorten it or pick an agent with a larger context_length"), "block")

    def _check_params(self, params: _Params, context_length: int | None) -> Iterable[Finding]:
        max_tokens = params.max_tokens
        if isinstance(max_tokens, int) and context_length is not None \
                and max_tokens >= context_length:
            yield Finding("params", "max_tokens", (
                f"max_tokens={max_tokens} can never be generated: the context is "
                f"{context_length} tokens, prompt included; ask for at most "
                f"{context_length - 1}"), "block")
        for i, stop in enumerate(params.stop or ()):
            if isinstance(stop, str) and len(stop) > self.config.max_stop_chars:
                yield Finding("params", "stop", (
                    f"stop[{i}] is {len(stop)} characters; stop sequences are at most "
                    f"{self.config.max_stop_chars}"), "block")

    def check_output(self, token_ids: Sequence[int], text: str, *, vocab_size: int) -> Verdict:
        """Is a generated chunk well-formed? Cheap enough to call per chunk.

        A token id outside the vocabulary or a control character means the runtime returned
        garbage: the integrator maps a blocking finding to `inference_failed`.
        """
        findings: list[Finding] = []
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
            bad = next(t for t in token_ids if not 0 <= t < vocab_size)
            findings.append(Finding("malformed_output", "output", (
                f"the model produced token id {bad}, outside its vocabulary of {vocab_size}"),
                "block"))
        if text and (m := _CONTROL.search(text)) is not None:
            findings.append(Finding("malformed_output", "output", (
                f"the model produced the control character U+{ord(m.group()):04X}"), "block",
                offset=m.start()))
        elif text and "\ufffd" in text:
            findings.append(Finding("malformed_output", "output",
                                    "the model produced bytes that are not UTF-8 text", "flag",
                                    offset=text.index("\ufffd")))
        return Verdict(tuple(findings))


# --- output: runaway repetition -------------------------------------------------------------

# A list that loops numbers its items: "3. same text", "4. same text". Only the leading
# marker is ignored, so code lines that differ by a number inside (handler_1, handler_2) differ.
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d+[.):]|[-*+\u2022]|step\s+\d+\s*:)\s*", re.IGNORECASE)
_MAX_LINE_KEY: Final = 512  # a line is compared by its start: bounded memory per line


class RepetitionGuard:
    """Streaming detector of a generation stuck in a loop. `feed(chunk)` is True: stop now.

    Two signs: the recent text ends in one unit repeated (a repeated n-gram or a cycle of
    lines: the tail is periodic), or one line (list numbering ignored) keeps coming back
    among the last lines. Cost per chunk: a few substring searches over a bounded window.
    """

    __slots__ = ("_counts", "_lines", "_partial", "_pending", "_tail", "check_every",
                 "line_repeats", "line_window", "max_period", "min_line_chars", "min_repeats",
                 "min_span_chars", "reason", "window")

    def __init__(self, *, min_repeats: int = 4, min_span_chars: int = 128,
                 max_period: int = 512, line_repeats: int = 8, line_window: int = 32,
                 min_line_chars: int = 16, check_every: int = 16) -> None:
        self.min_repeats = min_repeats
        self.min_span_chars = min_span_chars
        self.max_period = max_period
        self.line_repeats = line_repeats
        self.line_window = line_window
        self.min_line_chars = min_line_chars
        self.check_every = check_every
        self.window = max(max_period * min_repeats, min_span_chars) + max_period
        self._tail = ""
        self._pending = 0
        self._partial = ""
        self._lines: deque[str] = deque()
        self._counts: Counter[str] = Counter()
        self.reason: str | None = None  # why it stopped, once it has

    def feed(self, text: str) -> bool:
        if self.reason is not None:
            return True
        if not text:
            return False
        tail = self._tail + text
        if len(tail) > 2 * self.window:  # trim in batches: slicing every chunk copies it
            tail = tail[-self.window:]
        self._tail = tail
        if "\n" in text:
            if self._check_lines(text):
                return True
        elif len(self._partial) < _MAX_LINE_KEY:
            self._partial += text
        self._pending += len(text)
        if self._pending >= self.check_every:
            self._pending = 0
            return self._check_period()
        return False

    def _check_period(self) -> bool:
        tail = self._tail
        n = len(tail)
        probe = 8
        if n < self.min_span_chars:
            return False
        suffix = tail[-probe:]
        end = n - 1
        # A tail of period p has its last characters again p characters earlier: the nearest
        # earlier occurrences of the suffix are the only periods worth verifying.
        for _ in range(4):
            at = tail.rfind(suffix, max(0, n - probe - self.max_period), end)
            if at < 0:
                return False
            period = n - probe - at
            span = max(period * self.min_repeats, self.min_span_chars)
            if span <= n and tail[n - span + period:] == tail[n - span:n - period]:
                unit = tail[n - period:]
                self.reason = (f"the last {span} characters repeat {unit[:40]!r} "
                               f"({span // period} times)")
                return True
            end = at + probe - 1
        return False

    def _check_lines(self, text: str) -> bool:
        *done, self._partial = (self._partial + text).split("\n")
        for line in done:
            key = _LIST_MARKER.sub("", line[:_MAX_LINE_KEY]).strip()
            if len(key) < self.min_line_chars:
                key = ""
            self._lines.append(key)
            if key:
                self._counts[key] += 1
            if len(self._lines) > self.line_window:
                old = self._lines.popleft()
                if old:
                    self._counts[old] -= 1
            if key and self._counts[key] >= self.line_repeats:
                self.reason = (f"the line {key[:60]!r} came back {self._counts[key]} times "
                               f"in the last {len(self._lines)} lines")
                return True
        return False

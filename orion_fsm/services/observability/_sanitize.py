"""Redaction of secrets and personal data from logs and trace records, before they are written.

One rule per kind (API keys, tokens, private keys, e-mails, cards, IBANs, phones), each run
only on text that could hold it; checksums (Luhn, IBAN mod 97) spare numbers that look alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SENSITIVE_KEYS", "redaction", "sanitize", "sanitize_text"]


def redaction(kind: str) -> str:
    return f"[REDACTED:{kind}]"


# Values under these keys are secrets whatever they look like. Compared lower-cased with
# "-" as "_"; deliberately exact names: "tokens" and "token_ids" are counts and ids.
SENSITIVE_KEYS: Final = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "client_secret", "api_key", "apikey",
    "api_secret", "secret_key", "access_key", "aws_secret_access_key", "access_token",
    "refresh_token", "id_token", "auth_token", "session_token", "token", "authorization",
    "proxy_authorization", "cookie", "set_cookie", "private_key", "x_api_key",
})

_ASSIGNED_NAME = (
    r"api[_-]?key|apikey|api[_-]?secret|secret[_-]?key|client[_-]?secret|secret|passwords?|"
    r"passwd|passphrase|pwd|access[_-]?token|auth[_-]?token|refresh[_-]?token|session[_-]?token|"
    r"token|private[_-]?key|aws_secret_access_key|mot[ _]de[ _]passe"
)
# Digits inside a word (a hex id) or continuing a longer number (a version, 1.2.3) are not a
# card or a phone; a sentence's full stop after one is.
_NUMBER_START = r"(?<!\w)(?<!\d\.)"
_NUMBER_END = r"(?!\w|\.\d)"
_AWS_PREFIXES: Final = ("AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA")
_GITHUB_PREFIXES: Final = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
_ASSIGNMENT_WORDS: Final = ("secret", "pass", "pwd", "token", "api", "private", "mot")
# A run of at least 8 digits (separators allowed): every card and phone number has one.
_DIGIT_RUN: Final = re.compile(r"\d(?:[ ().+-]{0,2}\d){7}")


def _any_of(*literals: str) -> Callable[[str, str], bool]:
    return lambda text, lower: any(x in text for x in literals)


def _any_lower(*words: str) -> Callable[[str, str], bool]:
    return lambda text, lower: any(x in lower for x in words)


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    # Python's regex engine pays 10-20 ns per character per rule even where nothing matches;
    # a rule runs only on text holding what it cannot match without (substring tests, C speed).
    needs: Callable[[str, str], bool]
    valid: Callable[[str], bool] | None = None  # checksum: False keeps the text as it is
    # "v": redact only the value and keep its label ("password=" stays readable).
    value_only: bool = False


def _rule(kind: str, pattern: str, needs: Callable[[str, str], bool],
          valid: Callable[[str], bool] | None = None) -> _Rule:
    return _Rule(kind, re.compile(pattern), needs, valid, "(?P<v>" in pattern)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_brand(digits: str) -> bool:
    n, head2, head4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= head2 <= 55 or 2221 <= head4 <= 2720:
        return n == 16  # Mastercard
    if head2 in (34, 37):
        return n == 15  # Amex
    if head4 == 6011 or head2 == 65 or 644 <= int(digits[:3]) <= 649 or head2 == 62:
        return 16 <= n <= 19  # Discover, UnionPay
    if head2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19  # Diners
    if 3528 <= head4 <= 3589:
        return 16 <= n <= 19  # JCB
    return False


def _is_card(text: str) -> bool:
    groups = re.split(r"[ -]", text)
    if len(groups) > 1:
        sizes = [len(g) for g in groups]
        # Cards are written 4-4-4-4(-3) or 4-6-5 / 4-6-4; other groupings are other numbers.
        if not (all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4) \
                and sizes not in ([4, 6, 5], [4, 6, 4]):
            return False
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and _card_brand(digits) and _luhn(digits)


def _is_iban(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rotated = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rotated)
    return int(number) % 97 == 1


def _is_phone(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    return 8 <= digits <= 15


# Applied in order: a label-keeping rule (authorization) runs before the token rules that
# would otherwise redact its value under another name.
_RULES: Final[tuple[_Rule, ...]] = (
    _rule("private_key", r"-----BEGIN[A-Z0-9 ]{0,20} PRIVATE KEY(?: BLOCK)?-----(?s:.*?)"
                         r"(?:-----END[A-Z0-9 ]{0,20} PRIVATE KEY(?: BLOCK)?-----|\Z)",
          _any_of("PRIVATE KEY")),
    _rule("authorization", r"(?i)\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?"
                           r"(?:(?:basic|bearer|token|digest)\s+)?(?P<v>[^\s\"',;]{8,})",
          _any_lower("authorization")),
    _rule("bearer", r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)", _any_lower("bearer")),
    _rule("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", _any_of("eyJ")),
    _rule("openai_key", r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}",
          _any_of("sk-")),
    _rule("stripe_key", r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",
          _any_of("k_live_", "k_test_")),
    _rule("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[A-Z0-9]{16}\b",
          _any_of(*_AWS_PREFIXES)),
    _rule("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
          _any_of(*_GITHUB_PREFIXES)),
    _rule("slack_token", r"\bxox[abposre]-[A-Za-z0-9-]{10,}"
                         r"|https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+",
          _any_of("xox", "hooks.slack.com")),
    _rule("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b", _any_of("AIza")),
    _rule("url_password", r"\b[a-z][a-z0-9+.-]*://[^\s:/@]*:(?P<v>[^\s@/]+)@", _any_of("://")),
    _rule("assignment", r"(?i)\b(?:" + _ASSIGNED_NAME + r")[\"']?\s*(?:[:=]|=>)\s*[\"']?"
                        r"(?P<v>[^\s\"',;&<>]{4,})",
          lambda text, lower: ("=" in text or ":" in text)
          and any(w in lower for w in _ASSIGNMENT_WORDS)),
    _rule("email", r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b", _any_of("@")),
    _rule("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_iban),
    _rule("card", _NUMBER_START + r"\d(?:[ -]?\d){12,18}" + _NUMBER_END,
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_card),
    _rule("phone", r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w|\.\d)"
                   r"|" + _NUMBER_START + r"0[1-9](?:[ .-]?\d{2}){4}" + _NUMBER_END +
                   r"|" + _NUMBER_START + r"(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}" + _NUMBER_END,
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_phone),
)


def _replacer(rule: _Rule) -> Callable[[re.Match[str]], str]:
    marker = redaction(rule.kind)

    def replace(match: re.Match[str]) -> str:
        text = match.group()
        if rule.valid is not None and not rule.valid(text):
            return text
        if not rule.value_only:
            return marker
        start, end = match.span("v")
        offset = match.start()
        return text[: start - offset] + marker + text[end - offset:]

    return replace


_PASSES: Final = tuple((rule, _replacer(rule)) for rule in _RULES)
# Nothing shorter can hold any of the patterns (the shortest: an e-mail like "a@b.io").
_MIN_CANDIDATE = 6
# What at least one rule needs: text with none of it is clean without running any rule.
_SCREEN_LITERALS: Final = ("@", "://", "sk-", "k_live_", "k_test_", "eyJ", "xox", "AIza",
                           "PRIVATE KEY", *_AWS_PREFIXES, *_GITHUB_PREFIXES)
_SCREEN_WORDS: Final = ("authorization", "bearer", *_ASSIGNMENT_WORDS)
# Short strings found clean: trace records repeat the same state names, agents and paths.
# Only clean text is kept, so the cache never holds a secret.
_clean: dict[str, None] = {}
_CLEAN_MAX_CHARS = 256
_CLEAN_MAX_ENTRIES = 4096


def _screened_clean(text: str) -> bool:
    for literal in _SCREEN_LITERALS:
        if literal in text:
            return False
    lower = text.lower()
    for word in _SCREEN_WORDS:
        if word in lower:
            return False
    return _DIGIT_RUN.search(text) is None


def _remember_clean(text: str) -> None:
    if len(text) <= _CLEAN_MAX_CHARS:
        if len(_clean) >= _CLEAN_MAX_ENTRIES:
            _clean.clear()
        _clean[text] = None


def sanitize_text(text: str) -> str:
    """`text` with every secret and personal datum replaced by `[REDACTED:kind]`."""
    if len(text) < _MIN_CANDIDATE or text in _clean:
        return text
    if _screened_clean(text):
        _remember_clean(text)
        return text
    original, lower = text, text.lower()
    digits_found: bool | None = None
    for rule, replace in _PASSES:
        if rule.valid is not None:
            # The three number rules share one screening search.
            if digits_found is None:
                digits_found = rule.needs(text, lower)
            if not digits_found:
                continue
        elif not rule.needs(text, lower):
            continue
        text = rule.pattern.sub(replace, text)
    if text == original:
        _remember_clean(original)
    return text


_key_is_sensitive: dict[str, bool] = {}


def _sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    known = _key_is_sensitive.get(key)
    if known is None:
        known = key.lower().replace("-", "_") in SENSITIVE_KEYS
        if len(_key_is_sensitive) < _CLEAN_MAX_ENTRIES:
            _key_is_sensitive[key] = known
    return known


def sanitize(obj: Any) -> Any:
    """A copy of a JSON-able structure with secrets and personal data redacted.

    Strings are scanned; string values under sensitive keys (`password`, `api_key`, ...) are
    redacted whole. Unchanged containers are returned as they are, not copied: most of a trace
    record is numbers and ids, and copying them would cost more than scanning the text.
    """
    kind = type(obj)
    if kind is str:
        return sanitize_text(obj)
    if kind is dict:
        out: dict[Any, Any] | None = None
        for key, value in obj.items():
            vkind = type(value)
            if vkind in _SCALARS:
                continue
            if vkind is str:
                new: Any = redaction("secret") if value and _sensitive_key(key) \
                    else sanitize_text(value)
            else:
                new = sanitize(value)
            if new is not value:
                if out is None:
                    out = dict(obj)
                out[key] = new
        return obj if out is None else out
    if kind is list or kind is tuple:
        items: list[Any] | None = None
        for i, value in enumerate(obj):
            vkind = type(value)
            if vkind in _SCALARS:
                continue
            new = sanitize_text(value) if vkind is str else sanitize(value)
            if new is not value:
                if items is None:
                    items = list(obj)
                items[i] = new
        return obj if items is None else items
    return obj


_SCALARS: Final = frozenset({int, float, bool, type(None)})

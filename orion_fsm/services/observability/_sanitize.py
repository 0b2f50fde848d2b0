"""Redaction of secrets and personal data from logs and trace records, before they are written.

One rule per kind (API keys, tokens, private keys, e-mails, cards, IBANs, phones), each run
only on text that could hold it; checksums (Luhn, IBAN mod 97) spare numbers that look alike.
detect-secrets' detectors (Yelp) run after ours, on bounded windows. Every quantifier is
bounded, so the cost is linear in the text (`make bench`: 64k characters).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SENSITIVE_KEYS", "holds_secret", "redaction", "sanitize", "sanitize_text"]


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


def _led_by(first: str) -> str:
    """`first` (a character or class), then _NUMBER_START's test of what precedes it: a
    pattern that begins with a lookbehind loses the regex engine's C scan for its first
    character and tries every position in Python (~3x slower on 64k characters)."""
    return f"{first}(?<!\\w{first})(?<!\\d\\.{first})"
_AWS_PREFIXES: Final = ("AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA")
_GITHUB_PREFIXES: Final = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
_ASSIGNMENT_WORDS: Final = ("secret", "pass", "pwd", "token", "api", "private", "mot")
# "my password is X", "mon mot de passe est X": a secret named in a sentence.
_SPOKEN_NAME = (r"password|passwd|passphrase|passcode|pin(?: code)?|mot de passe|mdp|"
                r"code secret|contrase(?:ñ|n)a|passwort|api[ _-]?key|secret key|access key")
# What follows "the password is" in prose that gives no password.
_NOT_A_SECRET = (r"(?i:required|needed|mandatory|wrong|incorrect|invalid|correct|missing|empty|"
                 r"expired|too|not|never|always|set|changed|reset|the|an?|weak|strong|long|"
                 r"short|case|being|also|still|now|stored|saved|hidden|requis|obligatoire|"
                 r"incorrect|invalide|vide|trop|pas|une?|le|la|les|faux|expiré)")
_SPOKEN_WORDS: Final = ("pass", "pin", "mdp", "code secret", "contrase", "api", "key")
# A run of at least 8 digits (separators allowed): every card and phone number has one.
_DIGIT_RUN: Final = re.compile(r"\d(?:[ ().+-]{0,2}\d){7}")
# Text past this length is scanned by detect-secrets in overlapping windows of this size, so
# a pattern of theirs that backtracks costs a constant per window, never the whole text.
_WINDOW = 1024
_OVERLAP = 256


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
    word_start: bool = False  # the match must start a word (the pattern's \b, checked here)
    # The same pattern without (?i), run on the lower-cased text: a case-insensitive pattern
    # tries every position in Python (no first-character skip in C), ~10x slower on 64k.
    lowered: re.Pattern[str] | None = None
    # (literal, reach before, reach after): every match holds the literal and spans at most
    # this far around it, so the pattern runs only on windows around its occurrences.
    anchor: tuple[str, int, int] | None = None


def _rule(kind: str, pattern: str, needs: Callable[[str, str], bool],
          valid: Callable[[str], bool] | None = None, *, lower: bool = True,
          anchor: tuple[str, int, int] | None = None) -> _Rule:
    """`lower`: a (?i) pattern whose literals are all lower case also runs on the lower-cased
    text (tests/services/observability check that both find the same spans)."""
    # A leading \b stops Python's regex engine from scanning for a keyword's first letters
    # in C (3-5x slower on long text): the replacer checks the boundary instead. Keyword
    # rules only: on a pattern led by a character class, \b is what bounds the starts.
    word_start = pattern.startswith("(?i)\\b")
    if word_start:
        pattern = "(?i)" + pattern[6:]
    lowered = re.compile(pattern[4:]) if lower and pattern.startswith("(?i)") else None
    return _Rule(kind, re.compile(pattern), needs, valid, "(?P<v>" in pattern, word_start,
                 lowered, anchor)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD_SEPARATOR = re.compile(r"[ .-]")


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
    if not text[:4].isdigit():
        # Every grouping below starts with 4 digits: "1 1 1 1 …" is refused here, at a
        # fraction of a split (one call per 19-digit candidate on hostile text).
        return False
    groups = _CARD_SEPARATOR.split(text)
    if len(groups) > 1:
        sizes = [len(g) for g in groups]
        # Cards are written 4-4-4-4(-3) or 4-6-5 / 4-6-4; other groupings are other numbers.
        if not (all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4) \
                and sizes not in ([4, 6, 5], [4, 6, 4]):
            return False
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and _card_brand(digits) and _luhn(digits)


def _is_iban(text: str) -> bool:
    compact = text.replace(" ", "").upper()
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
    _rule("private_key", r"(?i)-----BEGIN[A-Z0-9 ]{0,20} PRIVATE KEY(?: BLOCK)?-----(?s:.*?)"
                         r"(?:-----END[A-Z0-9 ]{0,20} PRIVATE KEY(?: BLOCK)?-----|\Z)",
          _any_lower("private key"), lower=False),  # upper-case literals
    _rule("authorization", r"(?i)\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?"
                           r"(?:(?:basic|bearer|token|digest)\s{1,8})?(?P<v>[^\s\"',;]{8,4096})",
          _any_lower("authorization")),
    _rule("bearer", r"(?i)\bbearer\s{1,8}(?P<v>[A-Za-z0-9._~+/-]{16,4096}=*)",
          _any_lower("bearer")),
    _rule("jwt", r"\beyJ[A-Za-z0-9_-]{5,1024}\.eyJ[A-Za-z0-9_-]{5,8192}\.[A-Za-z0-9_-]{0,1024}",
          _any_of("eyJ")),
    _rule("openai_key", r"(?i)\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?"
                        r"[A-Za-z0-9_-]{20,512}", _any_lower("sk-")),
    _rule("stripe_key", r"(?i)\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,256}",
          _any_lower("k_live_", "k_test_")),
    _rule("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[A-Z0-9]{16}\b",
          _any_of(*_AWS_PREFIXES)),
    _rule("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
          _any_of(*_GITHUB_PREFIXES)),
    _rule("slack_token", r"\bxox[abposre]-[A-Za-z0-9-]{10,512}"
                         r"|https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{1,512}",
          _any_of("xox", "hooks.slack.com")),
    _rule("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b", _any_of("AIza")),
    _rule("url_password", r"(?i)\b[a-z][a-z0-9+.-]{0,30}://[^\s:/@]{0,256}:"
                          r"(?P<v>[^\s@/]{1,256})@", _any_of("://")),
    _rule("assignment", r"(?i)\b(?:" + _ASSIGNED_NAME + r")[\"']?\s{0,16}(?:[:=]|=>)\s{0,16}"
                        r"[\"']?(?P<v>[^\s\"',;&<>]{4,4096})",
          lambda text, lower: ("=" in text or ":" in text)
          and any(w in lower for w in _ASSIGNMENT_WORDS)),
    _rule("spoken_secret", r"(?i)\b(?:" + _SPOKEN_NAME + r")\s{1,4}(?:is|was|est|était|es|ist|"
                           r"is now|est maintenant|c'est|=|:)\s{0,4}[:\"'«]?\s{0,2}"
                           r"(?!\[(?i:redacted):|(?:" + _NOT_A_SECRET + r")\b)"
                           r"(?P<v>[^\s\"'»,;]{4,256})",
          _any_lower(*_SPOKEN_WORDS)),
    # Local part and labels bounded as RFC 5321 bounds them: linear on "a.a.a.a…" text.
    # Anchored on "@": on "a.a.a…" text, trying 64 characters at every position costs 35 ms.
    _rule("email", r"\b[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b",
          _any_of("@"), anchor=("@", 65, 64 * 8 + 26)),
    # Classes, not (?i): a case-insensitive pattern loses the engine's C prefix scan.
    _rule("iban", r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?\b",
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_iban),
    _rule("card", _led_by(r"\d") + r"(?:[ .-]?\d){12,18}" + _NUMBER_END,
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_card),
    _rule("phone", r"\+(?<![\w+]\+)[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w|\.\d)"
                   r"|" + _led_by("0") + r"[1-9](?:[ .-]?\d{2}){4}" + _NUMBER_END +
                   r"|(?:" + _led_by(r"\(") + r"\d{3}\) ?|" + _led_by(r"\d") + r"\d{2}[-.])"
                   r"\d{3}[-.]\d{4}" + _NUMBER_END,
          lambda text, lower: _DIGIT_RUN.search(text) is not None, _is_phone),
)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _replacer(rule: _Rule) -> Callable[[str, re.Match[str]], str]:
    """What replaces a match; `source` is the text redacted (the match may be of its
    lower-cased copy: same length, same offsets)."""
    marker = redaction(rule.kind)

    def replace(source: str, match: re.Match[str]) -> str:
        offset, end = match.span()
        text = source[offset:end]
        if rule.word_start and offset and _is_word_char(source[offset - 1]):
            return text
        if rule.valid is not None and not rule.valid(text):
            return text
        if not rule.value_only:
            return marker
        start, stop = match.span("v")
        return text[: start - offset] + marker + text[stop - offset:]

    return replace


def _matches(rule: _Rule, pattern: re.Pattern[str], text: str) -> Iterator[re.Match[str]]:
    """The pattern's matches in `text`, as `finditer` gives them; an anchored rule searches
    only the (merged) windows around its anchor, where each of its matches must lie."""
    if rule.anchor is None:
        yield from pattern.finditer(text)
        return
    literal, before, after = rule.anchor
    at = text.find(literal)
    while at >= 0:
        start, end = max(0, at - before), at + after
        at = text.find(literal, at + 1)
        while 0 <= at < end + before:  # the next window overlaps this one: merge them
            end = at + after
            at = text.find(literal, at + 1)
        # Lookbehinds and \b see the text before `start`; `end` lies past any match's end.
        yield from pattern.finditer(text, start, min(end, len(text)))


def _apply(rule: _Rule, replace: Callable[[str, re.Match[str]], str], text: str,
           lower: str) -> str:
    """`text` with the rule's matches replaced (found in `lower` when the rule allows it)."""
    pattern, subject = rule.pattern, text
    if rule.lowered is not None and len(lower) == len(text):  # "İ".lower() is 2 characters
        pattern, subject = rule.lowered, lower
    pieces: list[str] = []
    last = 0
    for match in _matches(rule, pattern, subject):
        start, end = match.span()
        pieces.append(text[last:start])
        pieces.append(replace(text, match))
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


_PASSES: Final = tuple((rule, _replacer(rule)) for rule in _RULES)
# Nothing shorter can hold any of the patterns (the shortest: an e-mail like "a@b.io").
_MIN_CANDIDATE = 6
# What at least one rule needs: text with none of it is clean without running any rule.
_SCREEN_LITERALS: Final = ("@", "://", "eyJ", "xox", "AIza", *_AWS_PREFIXES,
                           *_GITHUB_PREFIXES)
_SCREEN_WORDS: Final = ("authorization", "bearer", "sk-", "k_live_", "k_test_", "private key",
                        *_ASSIGNMENT_WORDS, *_SPOKEN_WORDS)
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


# --- detect-secrets ---------------------------------------------------------------------------
# Their regex detectors, with what each needs to be worth running (substring tests) and the
# shortest text it can match. Entropy, keyword and public-IP detectors are left out: they
# flag hashes, ids and prose that traces are full of; their JWT pattern backtracks on runs of
# "eyJ" and ours (above) finds the same tokens.


@dataclass(frozen=True, slots=True)
class _Detector:
    kind: str
    patterns: tuple[re.Pattern[str], ...]
    literals: tuple[str, ...]  # case-sensitive; any one must occur ("" = always run)
    min_len: int


_DETECTOR_NEEDS: Final[dict[str, tuple[str, tuple[str, ...], int]]] = {
    "ArtifactoryDetector": ("artifactory_token", ("AKC", "AP"), 10),
    "AWSKeyDetector": ("aws_key", ("A3T", "ABIA", "ACCA", "AKIA", "ASIA", "aws", "AWS"), 20),
    "AzureStorageKeyDetector": ("azure_storage_key", ("AccountKey=",), 99),
    "BasicAuthDetector": ("basic_auth", ("://",), 6),
    "CloudantDetector": ("cloudant_key", ("cloudant", "Cloudant", "CLOUDANT", "cl_", "CL_",
                                          "clou"), 12),
    "DiscordBotTokenDetector": ("discord_token", ("M", "N", "O"), 59),
    "GitHubTokenDetector": ("github_token", ("gh",), 40),
    "GitLabTokenDetector": ("gitlab_token", ("gl", "GR1348941"), 25),
    "IbmCloudIamDetector": ("ibm_cloud_key", ("ibm", "iam", "cloud", "IBM", "IAM", "Cloud",
                                              "CLOUD"), 44),
    "IbmCosHmacDetector": ("ibm_cos_key", ("secret", "SECRET", "Secret"), 32),
    "MailchimpDetector": ("mailchimp_key", ("-us",), 35),
    "NpmDetector": ("npm_token", ("_authToken",), 20),
    "OpenAIDetector": ("openai_key", ("T3BlbkFJ",), 51),
    "PrivateKeyDetector": ("private_key", ("PRIVATE KEY", "PuTTY"), 15),
    "PypiTokenDetector": ("pypi_token", ("pypi-",), 85),
    "SendGridDetector": ("sendgrid_key", ("SG.",), 69),
    "SlackDetector": ("slack_token", ("xox", "hooks.slack"), 15),
    "SoftlayerDetector": ("softlayer_key", ("softlayer", "Softlayer", "SOFTLAYER", "sl_", "SL_",
                                            "sl-"), 20),
    "SquareOAuthDetector": ("square_oauth_secret", ("sq0csp-",), 50),
    "StripeDetector": ("stripe_key", ("k_live_",), 32),
    "TelegramBotTokenDetector": ("telegram_token", (":",), 44),
    "TwilioKeyDetector": ("twilio_key", ("AC", "SK"), 34),
}
_detectors: tuple[_Detector, ...] | None = None
_detectors_lock = threading.Lock()


def _load_detectors() -> tuple[_Detector, ...]:
    """detect-secrets' regex detectors, imported once (~170 ms: the trace writer's thread
    pays it, see `warm_up`)."""
    global _detectors
    with _detectors_lock:
        if _detectors is None:
            from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

            found = []
            classes: list[Any] = list(get_mapping_from_secret_type_to_class().values())
            for cls in classes:
                needs = _DETECTOR_NEEDS.get(cls.__name__)
                if needs is None:
                    continue
                found.append(_Detector(needs[0], tuple(cls().denylist), needs[1], needs[2]))
            _detectors = tuple(found)
    return _detectors


def warm_up() -> None:
    """Import detect-secrets now (in a worker thread) rather than at the first secret."""
    _load_detectors()


def _windows(text: str) -> Iterator[str]:
    if len(text) <= _WINDOW:
        yield text
        return
    for start in range(0, len(text) - _OVERLAP, _WINDOW - _OVERLAP):
        yield text[start:start + _WINDOW]


def _detect_secrets_pass(text: str, scanned: str | None = None) -> str:
    """`text` with what detect-secrets finds in `scanned` (default: `text`) replaced, each
    finding everywhere it occurs. Scanning the text before our rules ran keeps their markers
    (`[REDACTED:spoken_secret]` holds "secret", a literal of theirs) from waking detectors."""
    scanned = text if scanned is None else scanned
    found: dict[str, str] = {}
    for detector in _load_detectors():
        if len(scanned) < detector.min_len or not any(x in scanned for x in detector.literals):
            continue
        for window in _windows(scanned):
            # Per window too: a literal somewhere in 64k characters is not in most windows.
            if len(window) < detector.min_len \
                    or not any(x in window for x in detector.literals):
                continue
            for pattern in detector.patterns:
                for match in pattern.finditer(window):
                    # Their group is the secret (a password after "user:"), or a prefix.
                    group = match.group(1) if pattern.groups else None
                    secret = group if group and len(group) >= 8 else match.group()
                    # Short findings would redact common words everywhere they occur.
                    if secret and len(secret) >= 8 and "[REDACTED:" not in secret:
                        found.setdefault(secret, detector.kind)
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, redaction(found[secret]))
    return text


def _detectors_might_match(text: str) -> bool:
    return any(len(text) >= d.min_len and any(x in text for x in d.literals)
               for d in _load_detectors())


def holds_secret(*texts: str) -> bool:
    """Whether the sanitiser would redact something in any of `texts`."""
    return any(isinstance(t, str) and sanitize_text(t) != t for t in texts)


def sanitize_text(text: str) -> str:
    """`text` with every secret and personal datum replaced by `[REDACTED:kind]`."""
    if len(text) < _MIN_CANDIDATE or text in _clean:
        return text
    if _screened_clean(text):
        if not _detectors_might_match(text):
            _remember_clean(text)
            return text
        text_out = _detect_secrets_pass(text)
        if text_out == text:
            _remember_clean(text)
        return text_out
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
        redacted = _apply(rule, replace, text, lower)
        if redacted is not text:
            text, lower = redacted, redacted.lower()
    text = _detect_secrets_pass(text, original)
    if text == original:
        _remember_clean(original)
    return text


_key_is_sensitive: dict[str, bool] = {}
# Ids and digests the engine makes (request, trace and span ids, model and registry digests,
# L1 keys): random hex, which now and then reads as a Luhn-valid card (4093609377352800) or a
# mod-97 IBAN (af65fa0f00390009): about one request id in 15,000. Kept as they are when
# they are hex, which no secret the rules look for is.
_ID_KEY_SUFFIXES: Final = ("request_id", "trace_id", "span_id", "sha256", "digest", "l1_key")
_HEX_ID = re.compile(r"[0-9a-f]{16,64}")


def _engine_id(key: object, value: str) -> bool:
    return isinstance(key, str) and (key == "id" or key.endswith(_ID_KEY_SUFFIXES)) \
        and _HEX_ID.fullmatch(value) is not None


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
                if _engine_id(key, value):
                    continue
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

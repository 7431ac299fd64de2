"""Authentication of websocket upgrade requests: bearer token, Twilio and AudioHook signatures.

- Token: ``Authorization: Bearer T``, ``X-API-KEY: T`` or ``?token=T``, compared in constant time.
- Twilio: ``X-Twilio-Signature`` = base64(HMAC-SHA1(auth token, full URL)); a websocket upgrade is a
  GET, so there are no POST parameters to append.
- AudioHook: HTTP message signature (draft-ietf-httpbis-message-signatures) with HMAC-SHA256 over
  ``@request-target``, ``@authority``, ``audiohook-organization-id``, ``audiohook-session-id``,
  ``audiohook-correlation-id`` and ``x-api-key``; ``keyid`` must equal ``X-API-KEY``; ``nonce`` of
  at least 22 characters; ``created`` at most 10 s old and not in the future, ``expires`` not
  passed (3 s clock skew allowed), as in Genesys's reference implementation. The client secret is
  base64; a key registered with an empty secret accepts unsigned requests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import parse_qs, urlsplit

MAX_CLOCK_SKEW = 3
MAX_SIGNATURE_AGE = 10
MIN_NONCE_LENGTH = 22
AUDIOHOOK_REQUIRED_COMPONENTS = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def request_token(headers: Mapping[str, str], path: str) -> str | None:
    """The token a request carries: bearer header, ``X-API-KEY`` or ``?token=``."""
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if headers.get("X-API-KEY"):
        return headers["X-API-KEY"].strip()
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


def token_ok(expected: str, headers: Mapping[str, str], path: str) -> bool:
    """Whether the request carries ``expected`` (constant-time comparison)."""
    given = request_token(headers, path)
    return given is not None and _same(given, expected)


# --- Twilio --------------------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the URL followed by the sorted POST
    parameters (key then value), keyed with the account's auth token."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def twilio_signature_ok(auth_token: str, signature: str | None, url: str) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) signs ``url``."""
    return bool(signature) and _same(twilio_signature(auth_token, url), signature or "")


# --- AudioHook (HTTP message signatures) ----------------------------------------------------------


@dataclass(frozen=True)
class AudioHookKey:
    """An API key and its client secret (raw bytes; empty = unsigned requests allowed)."""

    key: str
    secret: bytes

    @classmethod
    def parse(cls, text: str) -> "AudioHookKey":
        """``KEY:SECRET`` with the secret base64 as Genesys shows it; raises ``ValueError``."""
        key, sep, secret = text.partition(":")
        if not sep or not key:
            raise ValueError(f"expected KEY:SECRET (secret base64), got {text[:40]!r}")
        try:
            raw = base64.b64decode(secret, validate=True) if secret else b""
        except (binascii.Error, ValueError):
            raise ValueError("the AudioHook client secret must be base64") from None
        return cls(key, raw)


_TOKEN = re.compile(r"\s*([a-z*][a-z0-9_.*-]*)\s*")


class _SfParser:
    """Just enough of RFC 8941 structured fields for Signature-Input / Signature."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _ws(self) -> None:
        while self._peek() in (" ", "\t"):
            self.i += 1

    def key(self) -> str:
        m = _TOKEN.match(self.s, self.i)
        if not m:
            raise ValueError("expected a key")
        self.i = m.end()
        return m.group(1)

    def bare(self):
        c = self._peek()
        if c == '"':
            out, self.i = [], self.i + 1
            while True:
                c = self._peek()
                if c == "":
                    raise ValueError("unterminated string")
                self.i += 1
                if c == "\\":
                    out.append(self._peek())
                    self.i += 1
                elif c == '"':
                    return "".join(out)
                else:
                    out.append(c)
        if c == ":":
            end = self.s.index(":", self.i + 1)
            raw = self.s[self.i + 1 : end]
            self.i = end + 1
            return base64.b64decode(raw, validate=True)
        if c == "?":
            self.i += 2
            return self.s[self.i - 1] == "1"
        m = re.compile(r"-?\d+").match(self.s, self.i)
        if m:
            self.i = m.end()
            return int(m.group(0))
        m = re.compile(r"[A-Za-z*][A-Za-z0-9:/!#$%&'*+.^_`|~-]*").match(self.s, self.i)
        if m:
            self.i = m.end()
            return m.group(0)
        raise ValueError("bad item")

    def params(self) -> list[tuple[str, object]]:
        out = []
        while self._peek() == ";":
            self.i += 1
            self._ws()
            k = self.key()
            v: object = True
            if self._peek() == "=":
                self.i += 1
                v = self.bare()
            out.append((k, v))
        return out

    def member(self):
        if self._peek() == "(":
            self.i += 1
            items = []
            while True:
                self._ws()
                if self._peek() == ")":
                    self.i += 1
                    break
                items.append((self.bare(), self.params()))
            return ("list", items, self.params())
        return ("item", self.bare(), self.params())

    def dictionary(self) -> dict:
        out = {}
        self._ws()
        while self.i < len(self.s):
            k = self.key()
            if self._peek() == "=":
                self.i += 1
                out[k] = self.member()
            else:
                out[k] = ("item", True, self.params())
            self._ws()
            if self.i >= len(self.s):
                break
            if self._peek() != ",":
                raise ValueError("expected ','")
            self.i += 1
            self._ws()
        return out


def _encode_bare(value: object) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode() + ":"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _encode_params(params: list[tuple[str, object]]) -> str:
    return "".join(f";{k}" if v is True else f";{k}={_encode_bare(v)}" for k, v in params)


def signature_params(components: list[str], params: list[tuple[str, object]]) -> str:
    """The ``@signature-params`` value: ``("a" "b");k="v";n=1``."""
    return "(" + " ".join(_encode_bare(c) for c in components) + ")" + _encode_params(params)


def signature_base(components: list[str], values: Mapping[str, str], params: list[tuple[str, object]]) -> str:
    """The signed text: one ``"name": value`` line per component, then ``@signature-params``."""
    lines = [f"{_encode_bare(c)}: {values[c]}" for c in components]
    lines.append(f'"@signature-params": {signature_params(components, params)}')
    return "\n".join(lines)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else re.sub(r"[ \t]*\r\n[ \t]+", " ", value.strip())


MAX_NONCES = 100_000  # AudioHook nonces remembered at most (each for MAX_SIGNATURE_AGE + MAX_CLOCK_SKEW s)


class NonceCache:
    """Nonces of accepted AudioHook signatures, each kept for as long as its signature could be
    accepted (``MAX_SIGNATURE_AGE + MAX_CLOCK_SKEW`` seconds after ``created``): a replayed request
    is refused. At most ``capacity`` nonces (the oldest expiries are dropped first when full)."""

    def __init__(self, capacity: int = MAX_NONCES):
        self.capacity = capacity
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, nonce: str, expires_at: float, now: float) -> bool:
        """Remember ``nonce``; ``False`` when it is already remembered (a replay)."""
        if len(self._expiry) >= self.capacity or len(self._expiry) % 256 == 0:
            for old, expiry in list(self._expiry.items()):
                if expiry < now:
                    del self._expiry[old]
            while len(self._expiry) >= self.capacity:
                del self._expiry[min(self._expiry, key=self._expiry.get)]
        if self._expiry.get(nonce, -1.0) >= now:
            return False
        self._expiry[nonce] = expires_at
        return True


def verify_audiohook_request(
    headers: Mapping[str, str],
    request_target: str,
    keys: Mapping[str, bytes],
    now: float | None = None,
    nonces: NonceCache | None = None,
) -> str | None:
    """Check an AudioHook upgrade request; ``None`` when valid, else the reason it fails. With
    ``nonces``, a signature whose nonce was already accepted is refused (a replay)."""
    now = time.time() if now is None else now
    lower: dict[str, str] = {}
    items = headers.raw_items() if hasattr(headers, "raw_items") else headers.items()
    for name, value in items:  # case-insensitive; repeated fields joined as RFC 9110 says
        key = name.lower()
        lower[key] = f"{lower[key]}, {value}" if key in lower else value
    headers = lower
    api_key = _header(headers, "x-api-key")
    if not api_key:
        return 'missing "X-API-KEY" header'
    secret = keys.get(api_key)
    sig_input, sig = headers.get("signature-input"), headers.get("signature")
    if sig_input is None and sig is None:
        return None if secret == b"" else "request is not signed"
    if not sig_input or not sig:
        return 'need both "Signature" and "Signature-Input"'
    try:
        inputs, signatures = _SfParser(sig_input).dictionary(), _SfParser(sig).dictionary()
    except (ValueError, IndexError, binascii.Error):
        return "malformed signature header"
    if not inputs:
        return "empty Signature-Input"
    label, (kind, items, params) = next(iter(inputs.items()))
    signed = signatures.get(label)
    if kind != "list" or not signed or signed[0] != "item" or not isinstance(signed[1], bytes):
        return "malformed signature header"
    p = dict(params)
    if set(p) - {"alg", "created", "expires", "keyid", "nonce"}:
        return "unknown signature parameter"
    if p.get("alg", "hmac-sha256") != "hmac-sha256":
        return "unsupported signature algorithm"
    if not isinstance(p.get("keyid"), str) or not _same(p["keyid"], api_key):
        return "signature keyid does not match X-API-KEY"
    nonce = p.get("nonce")
    if not isinstance(nonce, str) or len(nonce) < MIN_NONCE_LENGTH:
        return "missing or short nonce"
    created, expires = p.get("created"), p.get("expires")
    if not isinstance(created, int) or isinstance(created, bool):
        return "missing created parameter"
    if created > now + MAX_CLOCK_SKEW:
        return "signature created in the future"
    if created + MAX_SIGNATURE_AGE < now + MAX_CLOCK_SKEW:
        return "signature expired"
    if expires is not None and (not isinstance(expires, int) or expires < now + MAX_CLOCK_SKEW):
        return "signature expired"
    components = []
    values: dict[str, str] = {}
    for name, comp_params in items:
        if not isinstance(name, str) or comp_params or name in values:
            return "invalid signature component"
        if name == "@request-target":
            value = request_target
        elif name == "@authority":
            value = _header(headers, "host")
        elif name.startswith("@"):
            return f"unsupported component {name}"
        else:
            value = _header(headers, name)
        if not value:
            return f"component {name} not present"
        components.append(name)
        values[name] = value
    missing = [c for c in AUDIOHOOK_REQUIRED_COMPONENTS if c not in values]
    if missing:
        return "signature does not cover " + ", ".join(missing)
    base = signature_base(components, values, params)
    key = secret if secret is not None else os.urandom(32)  # unknown key: same work, certain failure
    digest = hmac.new(key, base.encode("utf-8"), hashlib.sha256).digest()
    if not hmac.compare_digest(digest, signed[1]) or secret is None:
        return "signature does not match"
    if nonces is not None and not nonces.add(nonce, created + MAX_SIGNATURE_AGE + MAX_CLOCK_SKEW, now):
        return "nonce already used (a replayed request)"
    return None


def sign_audiohook_request(
    headers: dict[str, str],
    request_target: str,
    key: str,
    secret: bytes,
    created: int | None = None,
    expires_in: int = 10,
    nonce: str | None = None,
) -> dict[str, str]:
    """Add ``Signature-Input`` and ``Signature`` to ``headers`` (which need ``host``, the three
    ``audiohook-*`` headers and ``x-api-key``) as an AudioHook client does; returns ``headers``."""
    lower = {k.lower(): v for k, v in headers.items()}
    values = {"@request-target": request_target, "@authority": lower["host"]}
    for name in AUDIOHOOK_REQUIRED_COMPONENTS[2:]:
        values[name] = lower[name]
    created = int(time.time()) if created is None else created
    nonce = nonce or base64.b64encode(os.urandom(18)).decode()
    params: list[tuple[str, object]] = [
        ("keyid", key),
        ("nonce", nonce),
        ("alg", "hmac-sha256"),
        ("created", created),
        ("expires", created + expires_in),
    ]
    components = list(AUDIOHOOK_REQUIRED_COMPONENTS)
    digest = hmac.new(secret, signature_base(components, values, params).encode(), hashlib.sha256).digest()
    headers["Signature-Input"] = "sig1=" + signature_params(components, params)
    headers["Signature"] = "sig1=:" + base64.b64encode(digest).decode() + ":"
    return headers

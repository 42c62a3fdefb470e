"""The one redaction of the toolkit: credentials that a location may carry (``user:password@`` in a URL, the query
string of a signed URL, a ``token=``/``password=``/``Authorization:`` parameter, ``curl -u``) are cut out of
everything shown or stored: messages, warnings, progress lines, ``config.yaml``, checkpoints, trackers, cache file
names and ``predict`` rows. A run folder and its logs can then be shared without leaking anything.

Also here: :func:`terminal`, which escapes control characters (a file name holding ANSI escape codes) before text
reaches a terminal.
"""

from __future__ import annotations

import re
from typing import Any

MARK = "…"  # what stands where a credential was
# scheme://user:password@host → scheme://…@host (a user name alone may be a token too)
_USER_INFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")
# the query string of a URL (a signed URL's signature, expiry and token live there)
_QUERY = re.compile(r"(://[^\s'\"?<>]*)\?[^\s'\"<>]*")
# an Authorization header's value, up to the end of the quoted word or line
_AUTHORIZATION = re.compile(r"(?i)(\bauthorization\s*[:=]\s*)[^'\"\n]+")
# key=value / key: value where the key names a credential (x-amz-security-token=, password: ..., api_key=...)
_PARAMETER = re.compile(r"(?i)(\b(?:[\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key(?:[_-]?id)?"
                        r"|signature|credential)|sig|pwd)\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&'\",;)]+)")
# command-line credentials of a pipe: command (curl -u user:password, --password X, --token X)
_ARGUMENT = re.compile(r"((?:^|\s)(?:-u|--user|--password|--token|--secret)(?:\s+|=))(\S+)")


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``…``: user-info and query strings of URLs, credential
    parameters and arguments. Idempotent; text without credentials comes back unchanged."""
    if not isinstance(text, str):
        return text
    text = _USER_INFO.sub(rf"\1{MARK}@", text)
    text = _QUERY.sub(rf"\1?{MARK}", text)
    text = _AUTHORIZATION.sub(rf"\1{MARK}", text)
    text = _PARAMETER.sub(rf"\1{MARK}", text)
    return _ARGUMENT.sub(rf"\1{MARK}", text)


def redact_values(value: Any) -> Any:
    """A (nested) config value with every string redacted: what ``config.yaml``, checkpoints and trackers store."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


def without_credentials(url: str) -> str:
    """The location of ``url`` without user-info and query string: what identifies the object (a shard re-signed
    with a new signature is the same shard), e.g. for a cache file name."""
    url = _USER_INFO.sub(r"\1", url)
    return url.split("?", 1)[0] if "://" in url else url


# C0 controls (but tab and newline), DEL and the C1 controls: what makes a terminal move, recolour or rewrite
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_AND_NEWLINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def terminal(text: str, newlines: bool = True) -> str:
    """``text`` redacted, with control characters written as escapes (``\\x1b``) so that a file name cannot move
    the cursor, recolour or rewrite what the terminal shows; ``newlines`` False escapes line breaks too (one table
    cell, one row)."""
    pattern = _CONTROL if newlines else _CONTROL_AND_NEWLINE
    return pattern.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), redact(text))

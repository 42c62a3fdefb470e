"""Which failures of a remote read or write are faults to retry and which are final, and one readable, redacted line
for each: a missing file, a refused login or signature (401/403 and the S3 codes for them), another 4xx answer
stop at once; timeouts, resets, 5xx and 429 (after its ``Retry-After``) are retried by ``remote.py``.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

from .errors import AccessRefused, RemoteError, SimmimError
from .redact import redact


def describe(error: BaseException) -> str:
    """One readable line for an error: its type and first line (never a repr of pipes or argument lists), with
    every credential redacted."""
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        error = error.__cause__  # fsspec's HTTP layer wraps what went wrong while it asked for the size
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return redact(f"{type(error).__name__}: {text}" if text else type(error).__name__)


def _fatal(error: BaseException) -> bool:
    """Errors that no retry mends: a bug, a missing file, a refused login."""
    return isinstance(error, (PermissionError, TypeError, AttributeError, NameError,
                              AssertionError, ImportError, SimmimError))


# what a store answers to a refused login, signature or token (S3 and the S3-compatible stores)
REFUSED_CODES = {"AccessDenied", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
                 "InvalidAccessKeyId", "InvalidToken", "TokenRefreshRequired", "InvalidSecurity", "AllAccessDisabled",
                 "AccountProblem", "RequestTimeTooSkewed", "AuthorizationHeaderMalformed", "401", "403"}
MAX_RETRY_AFTER_S = 300.0  # a 429's Retry-After is honoured up to this long per try


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or while handling (fsspec and s3fs wrap the store's answer)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _answer(error: BaseException) -> tuple[int | None, str | None, BaseException | None]:
    """(HTTP status, S3 error code, the error that carries them) of the store's answer behind ``error``."""
    for cause in _causes(error):
        response = getattr(cause, "response", None)  # botocore's ClientError
        if isinstance(response, dict) and "Error" in response:
            return (response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response["Error"].get("Code"),
                    cause)
        status = getattr(cause, "status", None)  # aiohttp's ClientResponseError
        if isinstance(status, int):
            return status, None, cause
    return None, None, None


def _refused(error: BaseException) -> bool:
    """A refused login, signature or token: 401/403, S3's codes for them, missing credentials."""
    status, code, _ = _answer(error)
    return status in (401, 403) or code in REFUSED_CODES or any(
        isinstance(cause, PermissionError) or type(cause).__name__ in ("NoCredentialsError", "PartialCredentialsError")
        for cause in _causes(error))


def _final_answer(error: BaseException) -> int | None:
    """The status of a 4xx answer that no retry changes (not 408 Request Timeout, not 429 Too Many Requests)."""
    status = _answer(error)[0]
    return status if status is not None and 400 <= status < 500 and status not in (408, 429) else None


def retry_after(error: BaseException) -> float | None:
    """Seconds a 429 (or 503) answer asks to wait in its ``Retry-After`` header, or None."""
    status, _, cause = _answer(error)
    headers = getattr(cause, "headers", None) or {}
    value = headers.get("Retry-After") if status in (429, 503) and hasattr(headers, "get") else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:  # an HTTP date
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _refusal_fix(url: str) -> str:
    """What to check when ``url`` was refused, by how it authenticates."""
    if url.startswith("s3://"):
        return ("check the store's credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws; an "
                "expired session token needs a new one) and that they may read this bucket")
    if url.startswith(("gs://", "gcs://")):
        return "check GOOGLE_APPLICATION_CREDENTIALS (or gcloud auth application-default login) and the bucket's access"
    if "?" in url:
        return ("the signed URL has expired or was signed for another object or key: sign it again (a list file of "
                "signed URLs, given as --data LIST, is what a run records)")
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        return "check the user name and password in the URL"
    return ("the store wants credentials: its own environment variables or config files, a user:password@ in the URL "
            "or signed URLs")


def raise_if_final(url: str, error: BaseException) -> None:
    """Raises the one-line error for a failure of ``url`` that no retry mends (missing, refused, another 4xx, a
    bug); returns for a transient fault (a timeout, a reset, a 5xx, a 429), which is retried."""
    if _missing(error):
        raise RemoteError(f"{redact(url)} does not exist ({describe(error)}); check the URL", missing=True) from error
    if _refused(error):
        raise AccessRefused(f"access to {redact(url)} was refused ({describe(error)}); {_refusal_fix(url)}") from error
    status = _final_answer(error)
    if status is not None:
        raise RemoteError(f"the store answered {status} for {redact(url)} ({describe(error)}), which no retry "
                          "changes; check the URL", final=True) from error
    if _fatal(error):
        raise error


def _missing(error: BaseException) -> bool:
    """A file that is not there (fsspec's HTTP layer also reports a 503 or a refused connection while it looks
    for the size as FileNotFoundError, with the real error as its cause: those are faults to retry)."""
    if not isinstance(error, FileNotFoundError):
        return False
    cause = error.__cause__
    return cause is None or getattr(cause, "status", None) in (404, 410)

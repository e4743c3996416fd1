"""Hub calls that end: a timeout on every request, bounded retries, and one-line errors naming the endpoint.

huggingface_hub sends many requests without a timeout (repo info, commits, dataset listings), and retries a
failed metadata request with a 60 s timeout several times: against an endpoint that accepts connections and never
answers, a command waits for minutes or forever. `install_timeouts` gives every request made through
huggingface_hub's shared HTTP client (which transformers and datasets use too) a timeout when it has none, and caps
longer ones:

- `HF_HUB_DOWNLOAD_TIMEOUT` (huggingface_hub's default for requests without their own timeout, 10 s) bounds every
  wait for the server: connecting, each read and each write;
- `HF_HUB_ETAG_TIMEOUT` (10 s) is honoured where huggingface_hub asks for it, and a larger value of it raises the
  cap;
- requests that write (commits, uploads) may wait `WRITE_ANSWER_TIMEOUT` (at least 60 s) for the answer, because
  the server can take a while to process a large commit.

Calls this package makes itself go through `with_retries` (transient failures only, a bounded number of tries, a
timeout retried once) and end in one `WEMoEError` line that names the endpoint and what to try
(`hub_unreachable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http, get_session, set_client_factory

from hf_wemoe.errors import SourceError
from hf_wemoe.utils.formatting import one_line

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover -- older huggingface_hub releases use httpx
    import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Status codes worth retrying: timeout, rate limit, server errors.
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# The least time a request that writes (a commit, an upload) waits for the server's answer, in seconds.
WRITE_ANSWER_TIMEOUT = 60.0
_WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# Tries of one call this package makes (the first included), and the first wait between them in seconds.
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF = 1.0
_MAX_WAIT = 30.0


def hub_timeout() -> float:
    """Seconds any wait for the Hub may last: connect, each read, each write (see the module docstring)."""
    return float(max(constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT))


def endpoint() -> str:
    """The Hub endpoint requests go to (`HF_ENDPOINT`, or huggingface.co)."""
    return constants.ENDPOINT


def _bound_request_timeouts(request: Any) -> None:
    """Request hook: give the request a timeout where it has none, and cap the ones above the limit."""
    limit = hub_timeout()
    default = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    timeouts = dict(request.extensions.get("timeout") or {})
    # Waiting for a free connection of the pool ends when a connection does: only the network phases are bounded.
    for phase in ("connect", "read", "write"):
        value = timeouts.get(phase)
        timeouts[phase] = default if value is None else min(float(value), limit)
    if request.method in _WRITE_METHODS:
        timeouts["read"] = max(timeouts["read"], WRITE_ANSWER_TIMEOUT, limit)
    request.extensions = {**request.extensions, "timeout": timeouts}


_bound_request_timeouts.hf_wemoe = True  # marks the hook, so that it is added once per client


def install_timeouts() -> None:
    """Make every huggingface_hub request of this process end (idempotent; call before talking to the Hub).

    The hook is added to the shared client and to every client huggingface_hub creates later (after a fork, or
    when a caller sets its own client factory before this call).
    """
    # huggingface_hub has no public getter for the factory: wrapping the current one keeps a user's own factory
    # (proxies, certificates) and only adds the hook.
    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if factory is not None and not getattr(factory, "hf_wemoe", False):

        def bounded_factory():
            return _with_hook(factory())

        bounded_factory.hf_wemoe = True
        set_client_factory(bounded_factory)
    _with_hook(get_session())


def _with_hook(client: Any) -> Any:
    hooks = client.event_hooks
    requests = list(hooks.get("request", []))
    if not any(getattr(hook, "hf_wemoe", False) for hook in requests):
        client.event_hooks = {**hooks, "request": [*requests, _bound_request_timeouts]}
    return client


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: HTTP 408/429/5xx answers and connection-level errors (timeouts too)."""
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        return getattr(response, "status_code", None) in TRANSIENT_STATUS
    return is_connection_error(err)


def is_connection_error(err: BaseException) -> bool:
    """True when the Hub could not be reached or did not answer in time (no HTTP answer at all)."""
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


def with_retries(
    operation: Callable[[], T],
    what: str,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff: float = DEFAULT_BACKOFF,
    on_error: Callable[[BaseException, int], BaseException] | None = None,
) -> T:
    """Call a Hub operation, retrying transient failures with exponential backoff (`attempts` tries in all).

    A failure that is not transient, or the last one, is raised as `on_error(err, tries)` (default:
    `hub_unreachable` for connection errors, the error itself otherwise). Retries are logged at INFO level, so a
    failing command still ends in one line.
    """
    install_timeouts()
    attempts, backoff = max(1, int(attempts)), max(0.0, float(backoff))
    timeouts = 0
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as err:  # noqa: BLE001 -- classified below
            # A server that let one request time out rarely answers the next: waiting for it again and again only
            # multiplies the wait, so a timeout is retried once.
            timeouts += _is_timeout(err)
            if not is_transient(err) or attempt == attempts or timeouts > 1:
                if on_error is not None:
                    raise on_error(err, attempt) from err
                if is_connection_error(err):
                    raise hub_unreachable(err, what, attempt) from err
                raise
            wait = min(_MAX_WAIT, backoff * 2 ** (attempt - 1))
            logger.info(
                "%s failed (%s); retrying in %.1fs (attempt %d of %d)",
                what,
                one_line(err),
                wait,
                attempt + 1,
                attempts,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def hub_unreachable(err: BaseException, what: str, attempts: int = 1, *, advice: str = "") -> SourceError:
    """One line for a Hub that did not answer: the endpoint, what was tried, why, and what to do."""
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    reason = "timed out" if _is_timeout(err) else one_line(err)
    hint = advice or (
        f"check the network and HF_ENDPOINT, give slow connections more time with HF_HUB_DOWNLOAD_TIMEOUT "
        f"(now {hub_timeout():g} s), or set HF_HUB_OFFLINE=1 to use only cached files"
    )
    return SourceError(f"cannot reach the Hub at {endpoint()}{tried} trying to {what}: {reason}; {hint}")


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, (httpx.TimeoutException, TimeoutError))


def offline() -> bool:
    """True when huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`)."""
    return bool(is_offline_mode())


__all__ = [
    "DEFAULT_ATTEMPTS",
    "TRANSIENT_STATUS",
    "endpoint",
    "hub_timeout",
    "hub_unreachable",
    "install_timeouts",
    "is_connection_error",
    "is_transient",
    "offline",
    "with_retries",
]

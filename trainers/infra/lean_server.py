"""Lean checking over HTTP, in the Kimina Lean Server's API: a client for the `lean` reward and a server for a pool.

The API (project-numina/kimina-lean-server, its `server/routers` and `client/kimina_client/models.py`):

* `POST /api/check` with `{"snippets": [{"id", "code"}], "timeout": seconds, "debug", "reuse", "infotree"}`
  answers `{"results": [{"id", "time", "response": <the REPL's answer>} or {"id", "time", "error": "..."}]}`;
  an error that contains "timed out" is a timeout. Positions in messages count lines of the whole snippet,
  imports included (the REPL is sent the snippet without them).
* `POST /verify` (and `/one_pass_verify_batch`), the older form, takes `{"codes": [{"custom_id", "proof" or
  "code"}], "timeout", "infotree_type", "disable_cache"}` and answers `{"results": [{"custom_id", "error"?,
  "response"?}]}`, the response carrying its `time`.
* `GET /health` answers `{"status": "ok"}`; ours adds `"version"`, the Lean and Mathlib the checker runs,
  which the client puts in its cache keys (a Kimina server does not say: its URL stands in for it).
* A key, when the server has one, comes as `Authorization: Bearer <key>`.

`LeanServerClient.check_one(program)` gives the same (passed, reason) as `LeanReplPool.check_one`: the
verdict rules are lean_repl.py's `verdict`, applied to the REPL answer the server passes on.
`serve(...)` puts a `LeanReplPool` behind that API with the standard library's threading HTTP server.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import json
import os
import socket
import stat
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.trainers.infra.lean_repl import ReplError, ReplTimeout, first_line, split_imports, verdict

TOKEN_VARIABLES = ("TWOPHASE_LEAN_TOKEN", "LEAN_SERVER_API_KEY")  # ours, then the Kimina client's
CHECK_PATHS = ("/api/check", "/api/check/")
VERIFY_PATHS = ("/verify", "/verify/", "/one_pass_verify_batch")
HEALTH_PATHS = ("/health", "/health/", "/")
# Connection failures and these statuses are worth another try; any other refusal is final.
RETRIED_STATUSES = (429, 500, 502, 503, 504)


def token_from_environment() -> str | None:
    return next((os.environ[name] for name in TOKEN_VARIABLES if os.environ.get(name)), None)


# ---------------------------------------------------------------- the client


def result_verdict(result: dict, timeout: float) -> tuple[bool, str]:
    """(passed, reason) for one entry of a check answer, by the local pool's rules and reasons."""
    error = result.get("error")
    if error is not None:
        return False, f"timeout after {timeout:g}s" if "timed out" in str(error) else first_line(str(error))
    response = result.get("response")
    if not isinstance(response, dict):
        raise UserError(f"the Lean server answered a result with neither 'response' nor 'error': {str(result)[:120]}")
    return verdict(response)


class LeanServerClient:
    """Checks Lean programs on a server of the Kimina Lean Server API, one proof per request.

    `server` is a URL, or the file `twophase lean serve --url-file` writes (its URL and key), waited for up
    to `startup_wait` seconds: a Slurm job can start beside the server's job. Every request has a deadline
    (`request_timeout`: a fresh REPL imports Mathlib before it checks); a connection that fails, or an
    overloaded server, is retried `retries` times with doubling waits. Past that, or on a refusal (wrong key,
    a malformed request), the reward fails with one line: a proof is never scored 0 for the network's sake.
    """

    def __init__(self, server: str, timeout: float = 60.0, request_timeout: float = 660.0, retries: int = 4,
                 token: str | None = None, startup_wait: float = 900.0):  # fmt: skip
        self.url, file_token = _server_address(server, startup_wait)
        self.token = token or file_token or token_from_environment()
        self.timeout, self.request_timeout, self.retries = timeout, request_timeout, retries
        health = self._request("GET", "/health", None)
        self.version = str(health.get("version") or f"unreported by {self.url}")

    def check_one(self, program: str) -> tuple[bool, str]:
        body = {"snippets": [{"id": "0", "code": program}], "timeout": max(1, round(self.timeout))}
        results = self._request("POST", "/api/check", body).get("results")
        if not isinstance(results, list) or len(results) != 1 or not isinstance(results[0], dict):
            raise UserError(f"the Lean server at {self.url} answered without one result per snippet: {str(results)[:120]}")
        return result_verdict(results[0], self.timeout)

    def close(self) -> None:
        """Nothing stays open between requests."""

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        wait = 1.0
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.request_timeout) as answer:
                    return _json_object(answer.read(), self.url)
            except urllib.error.HTTPError as err:
                if err.code not in RETRIED_STATUSES:
                    raise UserError(_refusal(self.url, path, err)) from None
                failure = f"HTTP {err.code}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                failure = str(getattr(err, "reason", None) or err) or type(err).__name__
            if attempt < self.retries:
                time.sleep(wait)
                wait = min(2 * wait, 30.0)
        raise UserError(f"the Lean server at {self.url} cannot be reached ({failure}, {self.retries + 1} tries); "
                        f"start it (twophase lean serve) or fix reward_options.lean.server")  # fmt: skip


def _refusal(url: str, path: str, err: urllib.error.HTTPError) -> str:
    detail = first_line(err.read().decode("utf-8", "replace"))[:200]
    if err.code in (401, 403):
        return (f"the Lean server at {url} refused the key (HTTP {err.code}: {detail}); set {TOKEN_VARIABLES[0]} "
                f"to the server's --token")
    return f"the Lean server at {url} refused {path} (HTTP {err.code}: {detail})"


def _json_object(raw: bytes, url: str) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{url} does not answer as a Lean server (not a JSON object: {raw[:80]!r})")
    return value


def _server_address(server: str, startup_wait: float) -> tuple[str, str | None]:
    """(URL, key or None): `server` itself, or what the URL file names once it exists."""
    if server.startswith(("http://", "https://")):
        return server.rstrip("/"), None
    path, deadline = Path(server).expanduser(), time.monotonic() + startup_wait
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"reward_options.lean.server: neither an http(s) URL nor a file that appeared within "
                            f"{startup_wait:g}s ({path}); `twophase lean serve --url-file` writes that file")  # fmt: skip
        time.sleep(1.0)
    written = _json_object(path.read_bytes(), str(path))
    if not isinstance(written.get("url"), str):
        raise UserError(f"{path} names no server 'url'; `twophase lean serve --url-file` writes that file")
    return written["url"].rstrip("/"), written.get("token")


# ---------------------------------------------------------------- the server


class _Rejected(Exception):
    """A request refused with an HTTP status; the message is its one log line and the answer's detail."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key(host: str, token: str | None) -> None:
    """Listening beyond this machine without a key would let anyone on the network run Lean on it."""
    if not is_loopback(host) and not token:
        raise UserError(f"lean serve on {host} listens beyond this machine: give it a key (--token or "
                        f"{TOKEN_VARIABLES[0]}), which clients send as a bearer token")  # fmt: skip


class LeanCheckServer(ThreadingHTTPServer):
    """A `LeanReplPool` (anything with `answer(program, timeout)`, `size` and `version`) behind the API above."""

    daemon_threads = True
    request_queue_size = 256  # the default 5 drops a burst of clients' connections (each retried a second later)

    def __init__(self, pool, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_body_bytes: int = 4 << 20, max_snippets: int = 256, max_timeout: float = 300.0, log=print):  # fmt: skip
        check_key(host, token)
        self.pool, self.token, self.log = pool, token, log
        self.max_body_bytes, self.max_snippets, self.max_timeout = max_body_bytes, max_snippets, max_timeout
        self.checks = ThreadPoolExecutor(max_workers=pool.size, thread_name_prefix="lean-serve")
        try:
            super().__init__((host, port), _Handler)
        except OSError as err:
            raise UserError(f"lean serve cannot listen on {host}:{port} ({err.strerror or err})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if is_loopback(host) else socket.getfqdn()}:{port}"

    def write_url_file(self, path: Path) -> None:
        """The URL and key for clients on other machines, readable by this user only."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps({"url": self.url, "token": self.token}))
        os.chmod(temporary, stat.S_IRUSR | stat.S_IWUSR)
        os.replace(temporary, path)

    def answer_snippet(self, code: str, timeout: float) -> dict:
        """One checked snippet in the API's form: {"time", "response"} or {"time", "error"}."""
        started = time.perf_counter()
        try:
            entry = {"response": _in_snippet_lines(self.pool.answer(code, timeout), code)}
        except ReplTimeout:
            entry = {"error": f"Lean REPL command timed out in {timeout:g} seconds"}
        except ReplError as err:
            entry = {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - one snippet's failure is its own result, as in the local pool
            entry = {"error": f"repl error: {type(err).__name__}: {err}"}
        return {"time": round(time.perf_counter() - started, 3), **entry}

    def server_close(self) -> None:
        super().server_close()
        self.checks.shutdown(wait=False, cancel_futures=True)


def _in_snippet_lines(response: dict, code: str) -> dict:
    """Positions counted in the whole snippet, as the Kimina server reports them: the REPL saw it without its imports."""
    offset = code[: len(code) - len(split_imports(code)[1])].count("\n")
    for key in ("messages", "sorries"):
        for entry in response.get(key) or []:
            for where in ("pos", "endPos"):
                if isinstance(entry, dict) and isinstance(entry.get(where), dict) and "line" in entry[where]:
                    entry[where]["line"] += offset
    return response


class _Handler(BaseHTTPRequestHandler):
    server: LeanCheckServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """Accepted requests are not logged one by one; each rejected one is (in `_reject`)."""

    def do_GET(self):
        if self.path in HEALTH_PATHS:
            self._send(200, {"status": "ok", "version": self.server.pool.version})
        else:
            self._reject(_Rejected(404, f"no such path {self.path}"))

    def do_POST(self):
        try:
            if self.path not in CHECK_PATHS + VERIFY_PATHS:
                raise _Rejected(404, f"no such path {self.path}")
            self._authorise()
            body = self._body()
            self._send(200, self._check(body) if self.path in CHECK_PATHS else self._verify(body))
        except _Rejected as rejected:
            self._reject(rejected)

    def _authorise(self) -> None:
        if not self.server.token:
            return
        given = self.headers.get("Authorization", "")
        if not given:
            raise _Rejected(401, "Missing API key")
        if not hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), self.server.token.encode()):
            raise _Rejected(401, "Invalid API key")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _Rejected(411, "a Content-Length is required")
        if int(length) > self.server.max_body_bytes:
            raise _Rejected(413, f"request of {int(length)} bytes; the limit is {self.server.max_body_bytes}")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError:
            raise _Rejected(422, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise _Rejected(422, "the body is not a JSON object")
        return body

    def _snippets(self, entries, id_key: str, code_keys: tuple[str, ...]) -> list[tuple[str, str]]:
        if not isinstance(entries, list) or not entries:
            raise _Rejected(422, "no snippets to check")
        if len(entries) > self.server.max_snippets:
            raise _Rejected(413, f"{len(entries)} snippets in one request; the limit is {self.server.max_snippets}")
        snippets = []
        for entry in entries:
            code = next((entry[k] for k in code_keys if isinstance(entry, dict) and entry.get(k) is not None), None)
            if not isinstance(code, str) or not isinstance(entry.get(id_key), (str, int)):
                raise _Rejected(422, f"each snippet needs '{id_key}' and a text '{code_keys[0]}'")
            snippets.append((str(entry[id_key]), code))
        if len({snippet_id for snippet_id, _ in snippets}) != len(snippets):
            raise _Rejected(422, "snippet ids must be unique")
        return snippets

    def _timeout(self, body: dict, default: float) -> float:
        timeout = body.get("timeout", default)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise _Rejected(422, "timeout must be a positive number of seconds")
        return min(float(timeout), self.server.max_timeout)

    def _checked(self, snippets: list[tuple[str, str]], timeout: float) -> list[dict]:
        return list(self.server.checks.map(lambda snippet: self.server.answer_snippet(snippet[1], timeout), snippets))

    def _check(self, body: dict) -> dict:
        snippets = self._snippets(body.get("snippets"), "id", ("code",))
        answers = self._checked(snippets, self._timeout(body, 30))
        return {"results": [{"id": snippet_id, **answer} for (snippet_id, _), answer in zip(snippets, answers)]}

    def _verify(self, body: dict) -> dict:
        snippets = self._snippets(body.get("codes"), "custom_id", ("proof", "code"))
        answers = self._checked(snippets, self._timeout(body, 300))
        results = []
        for (snippet_id, _), answer in zip(snippets, answers):
            if "error" in answer:
                results.append({"custom_id": snippet_id, "error": answer["error"]})
            else:
                results.append({"custom_id": snippet_id, "response": {**answer["response"], "time": answer["time"]}})
        return {"results": results}

    def _reject(self, rejected: _Rejected) -> None:
        self.server.log(f"lean serve: rejected {self.command} {self.path} from {self.client_address[0]}: "
                        f"{rejected.status} {rejected}")  # fmt: skip
        self.close_connection = True  # an unread body must not be taken for the next request
        self._send(rejected.status, {"detail": str(rejected)})

    def _send(self, status: int, value: dict) -> None:
        payload = json.dumps(value, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

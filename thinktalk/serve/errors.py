"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error the client should see. Raised anywhere in the server; turned into a JSON response at the edge."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, retry_after: int, status: int = 429) -> APIError:
    kind = ("rate_limit_error", "rate_limit_exceeded") if status == 429 else ("server_error", "overloaded")
    return APIError(status, message, kind[0], None, kind[1], headers={"Retry-After": str(max(1, int(retry_after)))})


def server_error(message: str = "internal error while generating; the server logged the details") -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


UNION_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def pydantic_param(loc: tuple) -> str | None:
    """('messages', 0, 'content', 1, 'input_audio', 'data') -> 'messages[0].content[1].input_audio.data'."""
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in UNION_LABELS or part.startswith("function-")):
            continue  # pydantic's union-branch labels are noise to a client
        else:
            out += ("." if out else "") + str(part)
    return out or None


def from_validation_error(errors: list[dict]) -> APIError:
    """The most specific pydantic error as a 400 (OpenAI reports one problem at a time too).

    With unions (``content: str | list[part]``) pydantic reports every branch; the deepest location is
    the one the client meant (a bad part inside the list, not "content should be a string").
    """
    if not errors:
        return invalid("invalid request body")
    e = max(errors, key=lambda err: len((pydantic_param(tuple(err.get("loc", ()))) or "").replace("[", ".[")))
    param = pydantic_param(tuple(e.get("loc", ())))
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx", {}).get("error", "")
        return invalid(f"request body is not valid JSON ({ctx})".replace(" ()", ""), None, "invalid_json")
    msg = e.get("msg", "invalid value")
    where = f"'{param}'" if param else "request body"
    return invalid(f"{where}: {msg}", param, e.get("type"))

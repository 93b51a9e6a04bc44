"""API-key authentication for the prediction and metadata endpoints.

A request is authorised when either header carries the key:
- `X-API-Key: <key>` (what our client sends; works behind Cerebrium's gateway, which keeps
  `Authorization` for its own JWT), or
- `Authorization: Bearer <key>` (what Cerebrium-style clients send straight to the server).
Both are checked, so an `Authorization` header holding some other token never hides a valid
`X-API-Key`. Comparison is constant-time (`hmac.compare_digest`); the key is never logged.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

API_KEY_HEADER = "X-API-Key"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="onnxship", charset="UTF-8"'}


def _matches(candidate: str | None, key: bytes) -> bool:
    if not candidate:
        return False
    return hmac.compare_digest(candidate.strip().encode("utf-8", "surrogateescape"), key)


def presented_keys(headers) -> list[str]:
    """The keys a request presents; `headers`: Starlette's Headers or a dict of lower-case names."""
    keys = []
    header = headers.get("x-api-key")
    if header:
        keys.append(header)
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token)
    return keys


class ApiKeyAuth:
    """FastAPI dependency: `Depends(ApiKeyAuth(key))`; `key=None` means auth is disabled."""

    def __init__(self, api_key: str | None):
        self._key = api_key.encode("utf-8") if api_key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never show the key
        return f"ApiKeyAuth(enabled={self.enabled})"

    async def __call__(self, request: Request) -> None:  # async: FastAPI would run a plain def in a thread
        self.check(request.headers)

    def check(self, headers) -> None:
        """Raise 401 unless `headers` (Starlette's Headers or a dict of lower-case names) carry the key."""
        if self._key is None:
            return
        keys = presented_keys(headers)
        # evaluate every candidate (no short-circuit) so timing does not tell which header matched
        if any([_matches(candidate, self._key) for candidate in keys]):
            return
        if not keys:
            detail = (
                f"missing API key: send '{API_KEY_HEADER}: <key>' or 'Authorization: Bearer <key>' "
                "(the server's API_KEY)"
            )
        else:
            detail = f"invalid API key: the key in '{API_KEY_HEADER}' / 'Authorization: Bearer' does not match"
        raise HTTPException(status_code=401, detail=detail, headers=CHALLENGE)

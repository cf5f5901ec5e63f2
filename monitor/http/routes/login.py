"""Signing in to the status page: a token, posted once from a form, for a session cookie.

monitor/http/auth.py has the rules (what a session may do, how it is signed)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from pydantic import BaseModel

from monitor.http.audit import keep
from monitor.http.auth import Authorizer
from monitor.http.body import read_body
from monitor.http.errors import HttpError
from monitor.http.route import Reply, RouteTable
from monitor.http.routes.page import HTML
from monitor.http.sessions import SESSION_COOKIE, SESSION_SECONDS
from monitor.page.status_page import StatusPage

FORM_TYPES = ("application/x-www-form-urlencoded",)  # what the sign-in form sends
FORM_CHARSETS = ("utf-8", "utf8")  # the page is UTF-8, so is what its form posts
# The form has two fields (token, next); a few more leaves room, thousands is not a form.
MAX_FORM_FIELDS = 16
table = RouteTable()


class SignInForm(BaseModel):
    token: str
    next: str | None = None


class LoginRoutes:
    def __init__(self, auth: Authorizer, page: StatusPage) -> None:
        self.auth, self.page = auth, page

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/login",
        operation_id="loginPage",
        summary="Sign-in form (auth on): a token for a read-only session",
        replies=HTML,
        errors=(400, 401, 404),
    )
    async def login_form(self, request: web.Request) -> web.Response:
        return await self.page.login_page(
            _next_path(request.query.get("next")), audit_link=self.auth.reads_audit(request)
        )

    @table.post(
        "/login",
        operation_id="login",
        summary="Exchange a token for a read-only session cookie",
        body=SignInForm,
        body_media=FORM_TYPES[0],
        replies=(
            Reply(status=303, description="signed in (or auth is off): to `next`", body=False),
            Reply(status=401, description="not a valid token: the form again", media="text/html"),
        ),
        errors=(400, 403, 415),
        audit="session.login",
        audit_target="session",
    )
    async def login(self, request: web.Request) -> web.Response:
        """Exchange a token (form field) for a read-only session cookie."""
        if _cross_site(request):
            raise HttpError(403, "sign-in from another site is refused", code="forbidden")
        if not self.auth.enabled:
            raise web.HTTPSeeOther("/")
        raw = await read_body(request)  # bounded in size and time, like every other body
        if request.content_type not in FORM_TYPES:
            raise HttpError(415, f"expected a form ({FORM_TYPES[0]}), got {request.content_type!r}")
        if (request.charset or "utf-8").lower() not in FORM_CHARSETS:
            raise HttpError(415, f"expected a UTF-8 form, got charset {request.charset!r}")
        form = _sign_in_form(raw)
        target = _next_path(form.get("next", "/"))
        grant = self.auth.identify(f"Bearer {form.get('token', '')}")
        if grant is None:
            return await self.page.login_page(
                target,
                audit_link=self.auth.reads_audit(request),
                error="That token is not valid.",
                status=401,
            )
        await keep(request, actor=grant.name)  # the sign-in's record: its only write
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            SESSION_COOKIE,
            self.auth.session(grant),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    @table.post(
        "/logout",
        operation_id="logout",
        summary="End the session",
        replies=(Reply(status=303, description="to /login", body=False),),
    )
    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response


def _cross_site(request: web.Request) -> bool:
    """A form posted from another site. Browsers say so in Sec-Fetch-Site; older ones send
    Origin, which is "null" under our no-referrer policy, so only a real other origin counts."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin not in (None, "null") and urlsplit(origin).netloc != request.host


def _sign_in_form(raw: bytes) -> dict[str, str]:
    """The urlencoded sign-in form, or a 400. The message never quotes the body: it
    holds a token."""
    try:
        pairs = parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):  # not UTF-8, a field without "=", too many
        raise HttpError(
            400,
            "malformed form body: expected at most "
            f"{MAX_FORM_FIELDS} UTF-8 name=value fields joined by &",
        ) from None
    return dict(pairs)


def _next_path(raw: str | None) -> str:
    """Where to go after signing in: a path on this daemon, never another site."""
    if not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw:
        return "/"
    return raw

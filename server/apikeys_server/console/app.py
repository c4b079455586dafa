"""The console's routes (Starlette): each page calls the service through ``ApiKeysClient`` with
the signed-in operator's key, so authorization, validation and audit stay in the service.

Client calls block, so they run in Starlette's thread pool. Errors of the service become words
next to the field they concern (``field_violations``) or at the top of the form; the service
being unreachable is a 503 page saying so; any other failure is a plain 500 page (the
traceback goes to the log only, and the log never sees a key or a secret).
"""

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apikeys_client import (
    AlreadyGone,
    ApiKeysClient,
    ApiKeysError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from apikeys_server.config import ConsoleSettings
from apikeys_server.console import csrf, views
from apikeys_server.console.session import COOKIE_NAME, Session, SessionStore

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
KEYS_PAGE_SIZE = 20
EVENTS_PAGE_SIZE = 50
MAX_FORM_BYTES = 64 * 1024
# No inline script or style anywhere: htmx is configured (base.html's htmx-config) not to
# inject its indicator styles nor to eval anything.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
# The request fields the service names in its BadRequest details -> the form field shown.
FORM_FIELD = {
    "name": "name",
    "scopes": "scopes",
    "expire_time": "expires",
    "overlap": "overlap",
    "reason": "reason",
    "tenant_id": "tenant",
}
UNREACHABLE = (Unavailable, AlreadyGone)

T = TypeVar("T")
Handler = Callable[[Request, Session], Awaitable[Response]]


class SecurityHeaders:
    """The same protective headers on every response, static files included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SignInNeeded(Exception):
    """The page needs a signed-in operator (and, for a platform key, a chosen tenant)."""

    def __init__(self, to: str) -> None:
        self.to = to


class Console:
    def __init__(
        self, settings: ConsoleSettings, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.sessions = SessionStore(settings.idle_minutes * 60)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.globals["overlaps"] = views.OVERLAPS

    # -- plumbing ------------------------------------------------------------------------------

    def page(
        self, handler: Handler, *, signed_in: bool = True, tenant: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wraps a handler: its session (made if none), the CSRF check of a POST, the sign-in
        requirement, the service's unreachability and the operator's key ceasing to work."""

        async def endpoint(request: Request) -> Response:
            given = request.cookies.get(COOKIE_NAME)
            session, expired = self.sessions.get(given)
            if session is None:
                session = self.sessions.new()
                if expired:
                    minutes = f"{self.settings.idle_minutes:g}"
                    session.notice = f"You were signed out after {minutes} minutes idle."
            try:
                if request.method == "POST":
                    form = await request.form(max_part_size=MAX_FORM_BYTES)
                    token = form.get(csrf.FIELD)
                    sent = token if isinstance(token, str) else request.headers.get(csrf.HEADER)
                    if not csrf.valid(session.csrf_token, sent):
                        response = self.render(
                            request, session, "error.html", status_code=403,
                            title="Form refused",
                            message="This form did not come from this console session "
                            "(its security token is missing or out of date). Reload the page "
                            "and try again.",
                        )  # fmt: skip
                        return self._finish(request, session, response)
                if signed_in and not session.signed_in:
                    raise SignInNeeded("/signin")
                if signed_in and tenant and not session.tenant:
                    raise SignInNeeded("/tenant")
                request.state.session = session
                response = await handler(request, session)
                session = request.state.session  # signing in and out replace it
            except SignInNeeded as needed:
                response = redirect(request, needed.to)
            except UNREACHABLE as error:
                response = self.unreachable(request, session, error)
            except Unauthenticated as error:
                session = self.signed_out(session, error)
                response = redirect(request, "/signin")
            return self._finish(request, session, response)

        return endpoint

    def _finish(self, request: Request, session: Session, response: Response) -> Response:
        if request.cookies.get(COOKIE_NAME) != session.id:
            response.set_cookie(
                COOKIE_NAME,
                session.id,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    def render(
        self,
        request: Request,
        session: Session,
        template: str,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        notice = ""
        if not template.startswith("_"):  # a fragment (htmx) leaves it for the next page
            notice, session.notice = session.notice, ""
        response = self.templates.TemplateResponse(
            request,
            template,
            {"session": session, "csrf_token": session.csrf_token, "notice": notice, **context},
            status_code=status_code,
        )
        # Pages show a tenant's keys (and once, a secret): never kept by the browser or a proxy.
        response.headers["cache-control"] = "no-store"
        return response

    def unreachable(self, request: Request, session: Session, error: ApiKeysError) -> Response:
        log.warning("service at %s unreachable: %s", self.settings.target, error.code.name)
        return self.render(
            request,
            session,
            "error.html",
            status_code=503,
            title="The apikeys service is not answering",
            message=f"The console cannot reach the apikeys service at {self.settings.target} "
            f"({error.details}). If you were saving a change, look at the key before trying "
            "again: the service may or may not have made it.",
        )

    def signed_out(self, session: Session, error: ApiKeysError) -> Session:
        """The operator's key stopped working (revoked, expired): a fresh anonymous session."""
        self.sessions.drop(session)
        fresh = self.sessions.new()
        fresh.notice = f"Your key no longer works ({error.details}). Sign in with another key."
        return fresh

    @staticmethod
    async def call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(partial(function, *args, **kwargs))

    def client(self, session: Session) -> ApiKeysClient:
        assert session.client is not None  # page() lets only signed-in sessions through
        return session.client

    # -- sign-in, tenant, sign-out -------------------------------------------------------------

    async def signin_form(self, request: Request, session: Session) -> Response:
        if session.signed_in:
            return redirect(request, "/keys")
        return self.render(request, session, "signin.html", errors={})

    async def signin(self, request: Request, session: Session) -> Response:
        form = await request.form()
        key = text(form, "api_key").strip()
        if not key:
            return self.render(
                request, session, "signin.html", 400, errors={"api_key": "Paste a key."}
            )
        client = ApiKeysClient(
            self.settings.target,
            key,
            timeout=self.settings.timeout_seconds,
            credentials=self.credentials,
        )
        try:
            is_platform, tenant = await self.call(probe, client)
        except ApiKeysError as error:
            client.close()
            if isinstance(error, UNREACHABLE):
                return self.unreachable(request, session, error)
            return self.render(
                request, session, "signin.html", 403, errors={"api_key": sign_in_words(error)}
            )
        request.state.session = self.sessions.sign_in(
            session, client, is_platform=is_platform, tenant=tenant
        )
        return redirect(request, "/keys" if tenant else "/tenant")

    async def signout(self, request: Request, session: Session) -> Response:
        self.sessions.drop(session)
        fresh = self.sessions.new()
        fresh.notice = "Signed out."
        request.state.session = fresh
        return redirect(request, "/signin")

    async def tenant_form(self, request: Request, session: Session) -> Response:
        if not session.is_platform:
            return redirect(request, "/keys")
        return self.render(request, session, "tenant.html", errors={}, tenant=session.tenant)

    async def choose_tenant(self, request: Request, session: Session) -> Response:
        if not session.is_platform:
            return redirect(request, "/keys")
        form = await request.form()
        tenant = text(form, "tenant").strip()
        try:
            await self.call(self.client(session).list_keys_page, tenant_id=tenant, page_size=1)
        except ApiKeysError as error:
            refused(error)
            errors = field_errors(error, default="tenant")
            return self.render(request, session, "tenant.html", 400, errors=errors, tenant=tenant)
        session.tenant = tenant
        return redirect(request, "/keys")

    # -- keys ----------------------------------------------------------------------------------

    async def keys(self, request: Request, session: Session) -> Response:
        query = request.query_params
        prefix = query.get("prefix", "").strip()
        revoked = query.get("revoked") == "1"
        token = query.get("page", "")
        errors: dict[str, str] = {}
        rows: list[views.KeyRow] = []
        next_token = ""
        try:
            page = await self.call(
                self.client(session).list_keys_page,
                token,
                tenant_id=session.tenant,
                include_revoked=revoked,
                name_prefix=prefix,
                page_size=KEYS_PAGE_SIZE,
            )
        except ApiKeysError as error:
            refused(error)
            errors = field_errors(error, default="prefix")
        else:
            now = datetime.now(UTC)
            rows = [views.key_row(key, now) for key in page.keys]
            next_token = page.next_page_token
        template = "_keys_table.html" if request.headers.get("hx-request") else "keys.html"
        return self.render(
            request,
            session,
            template,
            rows=rows,
            prefix=prefix,
            revoked=revoked,
            paged=bool(token),
            next_token=next_token,
            errors=errors,
        )

    async def new_form(self, request: Request, session: Session) -> Response:
        return await self._new_page(request, session, {}, {"name": "", "scopes": [], "expires": ""})

    async def _new_page(
        self,
        request: Request,
        session: Session,
        errors: Mapping[str, str],
        values: Mapping[str, Any],
        status_code: int = 200,
    ) -> Response:
        catalog = await self.call(self.client(session).list_scopes)
        return self.render(
            request,
            session,
            "new.html",
            status_code,
            groups=views.scope_groups(catalog),
            errors=errors,
            values=values,
        )

    async def create(self, request: Request, session: Session) -> Response:
        form = await request.form()
        name = text(form, "name").strip()
        scopes = [value for value in form.getlist("scopes") if isinstance(value, str)]
        expires = text(form, "expires").strip()
        values = {"name": name, "scopes": scopes, "expires": expires}
        try:
            expire_time = end_of_day(expires)
        except ValueError:
            errors = {"expires": "Give a date as YYYY-MM-DD, or leave it empty."}
            return await self._new_page(request, session, errors, values, 400)
        try:
            created = await self.call(
                self.client(session).create_key,
                name,
                scopes,
                tenant_id=session.tenant,
                expire_time=expire_time,
            )
        except ApiKeysError as error:
            refused(error)
            return await self._new_page(request, session, field_errors(error), values, 400)
        return self.render(
            request,
            session,
            "secret.html",
            key=created.key,
            secret=created.secret,
            title="Key created",
            previous=None,
        )

    async def key_page(
        self,
        request: Request,
        session: Session,
        errors: Mapping[str, str] | None = None,
        status_code: int = 200,
        values: Mapping[str, Any] | None = None,
    ) -> Response:
        key_id = request.path_params["key_id"]
        client = self.client(session)
        try:
            key = await self.call(client.get_key, key_id, tenant_id=session.tenant)
        except (NotFound, InvalidArgument):
            return self.render(
                request, session, "error.html", status_code=404, title="No such key",
                message=f"There is no key {key_id} in tenant {session.tenant}.",
            )  # fmt: skip
        catalog = await self.call(client.list_scopes)
        events = await self.call(
            client.list_events_page,
            tenant_id=session.tenant,
            key_id=key.id,
            page_size=EVENTS_PAGE_SIZE,
        )
        now = datetime.now(UTC)
        return self.render(
            request,
            session,
            "key.html",
            status_code,
            row=views.key_row(key, now),
            groups=views.scope_groups(catalog),
            events=[views.event_row(event, now) for event in events.events],
            more_events=bool(events.next_page_token),
            errors=errors or {},
            values=values or {"name": key.name, "scopes": list(key.scopes)},
        )

    async def edit(self, request: Request, session: Session) -> Response:
        form = await request.form()
        key_id = request.path_params["key_id"]
        name = text(form, "name").strip()
        scopes = [value for value in form.getlist("scopes") if isinstance(value, str)]
        try:
            await self.call(
                self.client(session).update_key,
                key_id,
                tenant_id=session.tenant,
                name=name,
                scopes=scopes,
            )
        except ApiKeysError as error:
            refused(error)
            values = {"name": name, "scopes": scopes}
            return await self.key_page(request, session, field_errors(error), 400, values)
        session.notice = "Saved."
        return redirect(request, f"/keys/{key_id}")

    async def rotate(self, request: Request, session: Session) -> Response:
        form = await request.form()
        key_id = request.path_params["key_id"]
        seconds = text(form, "overlap")
        overlap = next((span for value, _, span in views.OVERLAPS if value == seconds), None)
        if overlap is None:
            return await self.key_page(request, session, {"overlap": "Pick an overlap."}, 400)
        try:
            rotated = await self.call(
                self.client(session).rotate_key, key_id, overlap, tenant_id=session.tenant
            )
        except ApiKeysError as error:
            refused(error)
            return await self.key_page(request, session, field_errors(error), 400)
        now = datetime.now(UTC)
        return self.render(
            request,
            session,
            "secret.html",
            key=rotated.key,
            secret=rotated.secret,
            title="Key rotated",
            previous=views.key_row(rotated.previous, now),
        )

    async def revoke(self, request: Request, session: Session) -> Response:
        form = await request.form()
        key_id = request.path_params["key_id"]
        reason = text(form, "reason").strip()
        if text(form, "confirm") != "yes":
            errors = {"confirm": "Tick the box to confirm: revoking cannot be undone."}
            return await self.key_page(request, session, errors, 400)
        try:
            await self.call(
                self.client(session).revoke_key, key_id, tenant_id=session.tenant, reason=reason
            )
        except ApiKeysError as error:
            refused(error)
            return await self.key_page(request, session, field_errors(error), 400)
        session.notice = "Revoked: the key stops working at once."
        return redirect(request, f"/keys/{key_id}")

    async def activity(self, request: Request, session: Session) -> Response:
        token = request.query_params.get("page", "")
        errors: dict[str, str] = {}
        rows: list[views.EventRow] = []
        next_token = ""
        try:
            page = await self.call(
                self.client(session).list_events_page,
                token,
                tenant_id=session.tenant,
                page_size=EVENTS_PAGE_SIZE,
            )
        except ApiKeysError as error:
            refused(error)
            errors = field_errors(error)
        else:
            now = datetime.now(UTC)
            rows = [views.event_row(event, now) for event in page.events]
            next_token = page.next_page_token
        return self.render(
            request,
            session,
            "activity.html",
            events=rows,
            next_token=next_token,
            paged=bool(token),
            errors=errors,
        )

    async def home(self, request: Request, session: Session) -> Response:
        return redirect(request, "/keys")

    # -- the application -----------------------------------------------------------------------

    def app(self) -> Starlette:
        page = self.page

        def healthz(_request: Request) -> Response:
            return PlainTextResponse("ok")

        routes = [
            Route("/healthz", healthz),
            Route("/", page(self.home)),
            Route("/signin", page(self.signin_form, signed_in=False)),
            Route("/signin", page(self.signin, signed_in=False), methods=["POST"]),
            Route("/signout", page(self.signout, signed_in=False), methods=["POST"]),
            Route("/tenant", page(self.tenant_form, tenant=False)),
            Route("/tenant", page(self.choose_tenant, tenant=False), methods=["POST"]),
            Route("/keys", page(self.keys)),
            Route("/keys/new", page(self.new_form)),
            Route("/keys/new", page(self.create), methods=["POST"]),
            Route("/keys/{key_id}", page(self.key_page)),
            Route("/keys/{key_id}/edit", page(self.edit), methods=["POST"]),
            Route("/keys/{key_id}/rotate", page(self.rotate), methods=["POST"]),
            Route("/keys/{key_id}/revoke", page(self.revoke), methods=["POST"]),
            Route("/activity", page(self.activity)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(SecurityHeaders)],
            exception_handlers={500: self.failed},
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        yield
        self.sessions.close()  # the operators' clients and their channels

    async def failed(self, request: Request, error: Exception) -> Response:
        """A bug: a plain page for the browser. Starlette raises the error again after this
        answer, and uvicorn logs its traceback (which never holds a key or a secret)."""
        return PlainTextResponse(
            "The console failed to answer this request; the details are in its log.",
            status_code=500,
        )


# -- helpers -------------------------------------------------------------------------------------


def probe(client: ApiKeysClient) -> tuple[bool, str]:
    """Whether the key is a platform key, and its tenant ("" for a platform key): a tenant key
    lists its own tenant's keys (itself among them); a platform key must name a tenant."""
    try:
        page = client.list_keys_page(page_size=1)
    except InvalidArgument as error:
        if error.reason == "TENANT_REQUIRED":
            return True, ""
        raise
    if not page.keys:  # cannot happen: the caller's own key is in its tenant
        raise PermissionDenied(grpc.StatusCode.PERMISSION_DENIED, "the key's tenant is unknown")
    return False, page.keys[0].tenant_id


def refused(error: ApiKeysError) -> None:
    """Re-raises what page() answers for every page (the service unreachable, the operator's
    key no longer working); any other refusal is the caller's to show next to its form."""
    if isinstance(error, (*UNREACHABLE, Unauthenticated)):
        raise error


def sign_in_words(error: ApiKeysError) -> str:
    if isinstance(error, Unauthenticated):
        return f"This key is not accepted by the service: {error.details}"
    if isinstance(error, PermissionDenied):
        return (
            f"This key may not use the console ({error.details}). Use a tenant admin key "
            "(apikeys:read and apikeys:manage) or a platform key."
        )
    return error.details


def field_errors(error: ApiKeysError, default: str = "form") -> dict[str, str]:
    """The service's error as words per form field ("form": at the top of the form)."""
    found: dict[str, str] = {}
    for path, description in error.field_violations:
        root = path.split("[", 1)[0].split(".", 1)[0]
        found.setdefault(FORM_FIELD.get(root, default), description or error.details)
    if not found:
        found[default] = error.details
    return found


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def end_of_day(day: str) -> datetime | None:
    """The expiry for a date picked in the form: the end of that day, UTC (None if empty)."""
    if not day:
        return None
    picked = datetime.strptime(day, "%Y-%m-%d").date()
    return datetime.combine(picked + timedelta(days=1), time.min, tzinfo=UTC)


def redirect(request: Request, to: str) -> Response:
    """After a POST, or to the sign-in page; htmx follows its own header instead."""
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"hx-redirect": to})
    return RedirectResponse(to, status_code=303)


def build(settings: ConsoleSettings, credentials: grpc.ChannelCredentials | None) -> Starlette:
    return Console(settings, credentials).app()

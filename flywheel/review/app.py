"""The human review page (the flywheel's one manual step) and a FiftyOne-style table browser.

FastAPI, server-rendered HTML, no front-end build. Every route needs a signed session cookie from
`/login` (token from ``review.token`` or $FLYWHEEL_REVIEW_TOKEN); without it a page answers 401 with
the sign-in form. Writes are POST forms carrying a CSRF token bound to the session. Thumbnails are
served by table name and row id only (ids are checked against a strict pattern and looked up in
Lance; no file path ever reaches a URL), decoded from the Lance image blobs.

Browsing reads one page per request: an unsorted page is a Lance scan with the filter, `limit` and
`offset`; a sorted page reads the sort column alone (plus row ids) under the filter once, keeps the
order cached per table version, and takes the page's rows by row id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import html
import io
import json
import re
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlencode

import lance
import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.typed_config import ConfigError
from flywheel.config import TOKEN_ENV, FlywheelConfig
from flywheel.review.templates import render
from flywheel.schema import DECISIONS, REVIEWS
from flywheel.store import connect, existing, open_table, read, storage_options, upsert

ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
COOKIE = "fw_session"
SESSION_S = 12 * 3600
LABELS = ("stage", "keep", "reject_reason", "source", "category", "caption_status")


def _q(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


class Signer:
    """HMAC-signed session values and CSRF tokens; the key derives from the sign-in token."""

    def __init__(self, token: str):
        self.token = token
        self.key = hashlib.sha256(b"flywheel-review\0" + token.encode()).digest()

    def _mac(self, msg: str) -> str:
        return hmac.new(self.key, msg.encode(), hashlib.sha256).hexdigest()

    def session(self, reviewer: str) -> str:
        body = base64.urlsafe_b64encode(json.dumps({"u": reviewer, "exp": int(time.time()) + SESSION_S}).encode()).decode()
        return f"{body}.{self._mac(body)}"

    def user(self, value: str | None) -> str | None:
        if not value or "." not in value:
            return None
        body, mac = value.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        data = json.loads(base64.urlsafe_b64decode(body))
        return data["u"] if data["exp"] > time.time() else None

    def csrf(self, session: str) -> str:
        return self._mac("csrf:" + session)


class Tables:
    """Browsable Lance tables by name (pools, their captions, review.tables) and their thumbnails."""

    def __init__(self, cfg: FlywheelConfig):
        self.uris = {**{n: p.curated for n, p in cfg.pools.items()},
                     **{f"{n}_captions": p.captions for n, p in cfg.pools.items() if p.captions},
                     **cfg.review.tables}
        self.thumb_px = cfg.review.thumb_px
        self.rowids: OrderedDict = OrderedDict()  # (table, version, id) -> row id, filled by page scans
        self.orders: OrderedDict = OrderedDict()  # (table, version, filter, sort, order) -> row ids

    def dataset(self, name: str) -> lance.LanceDataset:
        if name not in self.uris:
            raise HTTPException(404, "no such table")
        uri = self.uris[name]
        return lance.dataset(uri, storage_options=storage_options(uri))

    def image_source(self, name: str) -> tuple[str, lance.LanceDataset]:
        """The table holding the images of `name`'s rows: itself, or (a captions table) the curated
        table named in its schema metadata, or the pool it belongs to."""
        ds = self.dataset(name)
        if "image" in ds.schema.names:
            return name, ds
        src = (ds.schema.metadata or {}).get(b"captioning.source_uri")
        for n, u in self.uris.items():
            if (src and u == src.decode()) or (name == f"{n}_captions"):
                return n, self.dataset(n)
        raise HTTPException(404, "this table has no images")

    def remember(self, name: str, version: int, ids: list[str], rowids: list[int]) -> None:
        for i, r in zip(ids, rowids, strict=True):
            self.rowids[(name, version, i)] = r
        while len(self.rowids) > 50_000:
            self.rowids.popitem(last=False)

    def lookup(self, name: str, ds: lance.LanceDataset, ids: list[str]) -> dict[str, int]:
        missing = [i for i in ids if (name, ds.version, i) not in self.rowids]
        if missing:  # one scan for the whole page, not one per thumbnail
            t = ds.to_table(columns=["id"], filter=f"id IN ({', '.join(map(_q, missing))})", with_row_id=True)
            self.remember(name, ds.version, t["id"].to_pylist(), t["_rowid"].to_pylist())
        return {i: self.rowids[(name, ds.version, i)] for i in ids if (name, ds.version, i) in self.rowids}

    def thumbnail(self, name: str, row_id: str) -> bytes:
        src, ds = self.image_source(name)
        rid = self.lookup(src, ds, [row_id]).get(row_id)
        if rid is None:
            raise HTTPException(404, "no such row")
        data = dict(ds.read_blobs("image", ids=[rid])).get(rid)
        return _thumb(data, self.thumb_px) if data else _placeholder(self.thumb_px)


@functools.lru_cache(maxsize=4096)
def _thumb(data: bytes, px: int) -> bytes:
    from curation.table import load_image

    try:
        im = load_image(data, short_side=px)
    except ValueError:
        return _placeholder(px)
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def _placeholder(px: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (px, px), (200, 200, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _caption_text(row: dict) -> str:
    if row.get("caption_general"):
        try:
            return json.loads(row["caption_general"])["en"]["short"]
        except (ValueError, KeyError, TypeError):
            return row["caption_general"][:300]
    return row.get("caption") or ""


def create_app(cfg: FlywheelConfig) -> FastAPI:
    token = cfg.review_token()
    if not token:
        raise ConfigError(f"review.token: not set (and ${TOKEN_ENV} is empty): the review page needs a sign-in token")
    signer, tables = Signer(token), Tables(cfg)
    db = connect(cfg.workdir)
    app = FastAPI(title="flywheel review", docs_url=None, redoc_url=None, openapi_url=None)
    page_size = cfg.review.page_size

    def user_of(request: Request) -> tuple[str, str]:
        session = request.cookies.get(COOKIE)
        user = signer.user(session)
        if user is None:
            raise HTTPException(401, "sign in first")
        return user, signer.csrf(session)

    def check_csrf(request: Request, csrf: str) -> str:
        user, expected = user_of(request)
        if not hmac.compare_digest(csrf or "", expected):
            raise HTTPException(403, "bad or missing CSRF token")
        return user

    def show(name: str, request: Request, status: int = 200, **ctx) -> HTMLResponse:
        user, csrf = user_of(request)
        return HTMLResponse(render(name, user=user, csrf=csrf, tables=list(tables.uris), **ctx), status_code=status)

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, exc: HTTPException):
        if exc.status_code == 401:
            nxt = request.url.path if request.method == "GET" else "/queue"
            return HTMLResponse(render("login", error=None, next=nxt), status_code=401)
        return HTMLResponse(f"<h1>{exc.status_code}</h1><p>{html.escape(str(exc.detail))}</p>",
                            status_code=exc.status_code)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(next: str = "/queue"):
        return render("login", error=None, next=next if next.startswith("/") and not next.startswith("//") else "/queue")

    @app.post("/login")
    def login(token: str = Form(...), reviewer: str = Form(...), next: str = Form("/queue")):
        reviewer = reviewer.strip()[:64]
        if not hmac.compare_digest(token.encode(), signer.token.encode()) or not reviewer:
            return HTMLResponse(render("login", error="wrong token", next="/queue"), status_code=401)
        target = next if next.startswith("/") and not next.startswith("//") else "/queue"
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, signer.session(reviewer), httponly=True, samesite="strict", max_age=SESSION_S)
        return resp

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")):
        check_csrf(request, csrf)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/")
    def root(request: Request):
        user_of(request)
        return RedirectResponse("/queue", status_code=303)

    # ------------------------------------------------------------------ review queue
    @app.get("/queue", response_class=HTMLResponse)
    def queue(request: Request, track: str = "", category: str = "", source: str = "", status: str = "open",
              page: int = 0):
        user_of(request)
        q = open_table(db, "queue")
        routes = read(open_table(db, "routes"), ["case_id", "track"], "status = 'routed'").to_pylist()
        track_of = {r["case_id"]: r["track"] for r in routes}
        reviews = {r["item_id"]: r for r in read(open_table(db, "reviews")).to_pylist()}
        conds = [f"{c} = {_q(v)}" for c, v in (("category", category), ("source", source)) if v]
        if track:
            cases = [c for c, t in track_of.items() if t == track] or ["-"]
            conds.append(f"case_id IN ({', '.join(map(_q, cases))})")
        if status in DECISIONS or status == "open":
            done = [i for i, r in reviews.items() if r["decision"] == status] if status in DECISIONS else list(reviews)
            if status in DECISIONS:
                conds.append(f"item_id IN ({', '.join(map(_q, done or ['-']))})")
            elif done:
                conds.append(f"item_id NOT IN ({', '.join(map(_q, done))})")
        where = " AND ".join(conds) or None
        ds = q.to_lance()
        total = ds.count_rows(filter=where)
        cols = ["item_id", "case_id", "kind", "pool", "pool_id", "base_id", "text", "category", "source",
                "similarity", "reject_reason"]
        rows = ds.to_table(columns=cols, filter=where, limit=page_size, offset=page * page_size).to_pylist()
        prompts = {c["case_id"]: c["prompt"] for c in existing(open_table(db, "cases"), "case_id",
                                                              list({r["case_id"] for r in rows}), ("prompt",)).to_pylist()}
        for pool in {r["pool"] for r in rows if r["pool"] in tables.uris}:
            tables.lookup(pool, tables.dataset(pool), [i for r in rows if r["pool"] == pool
                                                      for i in (r["pool_id"], r["base_id"]) if i])
        for r in rows:
            rv = reviews.get(r["item_id"], {})
            r.update(track=track_of.get(r["case_id"]), prompt=prompts.get(r["case_id"], ""),
                     decision=rv.get("decision"), reviewer=rv.get("reviewer"))
        all_q = read(q, ["category", "source"])
        choices = {"track": sorted(set(track_of.values())),
                   "category": sorted({c for c in all_q["category"].to_pylist() if c}),
                   "source": sorted({c for c in all_q["source"].to_pylist() if c})}
        f = {"track": track, "category": category, "source": source, "status": status}
        link = lambda p: "/queue?" + urlencode({**f, "page": p})  # noqa: E731
        return show("queue", request, items=rows, total=total, page=page, f=f, choices=choices, back=link(page),
                    prev=link(page - 1), next=link(page + 1), more=(page + 1) * page_size < total)

    def decide(user: str, item_ids: list[str], decision: str) -> int:
        if decision not in DECISIONS:
            raise HTTPException(400, "decision must be approve or reject")
        ids = [i for i in item_ids if ID_RE.match(i)]
        known = existing(open_table(db, "queue"), "item_id", ids)["item_id"].to_pylist()
        now = datetime.now(UTC)
        rows = [dict(item_id=i, decision=decision, reviewer=user, reviewed_at=now) for i in known]
        # same decision twice = no write; a changed mind updates reviewer and time
        return upsert(open_table(db, "reviews"), pa.Table.from_pylist(rows, schema=REVIEWS), compare=("decision",))

    def back_to(back: str) -> RedirectResponse:
        return RedirectResponse(back if back.startswith("/queue") else "/queue", status_code=303)

    @app.post("/review")
    def review(request: Request, item_id: str = Form(...), decision: str = Form(...), csrf: str = Form(""),
               back: str = Form("/queue")):
        decide(check_csrf(request, csrf), [item_id], decision)
        return back_to(back)

    @app.post("/review/page")
    def review_page(request: Request, item_ids: Annotated[list[str], Form()], decision: str = Form(...),
                    csrf: str = Form(""), back: str = Form("/queue")):
        decide(check_csrf(request, csrf), item_ids, decision)
        return back_to(back)

    # ------------------------------------------------------------------ thumbnails and browsing
    @app.get("/thumb/{table}/{row_id}")
    def thumb(request: Request, table: str, row_id: str):
        user_of(request)
        if not ID_RE.match(row_id):
            raise HTTPException(404, "no such row")
        return Response(tables.thumbnail(table, row_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/browse/{table}", response_class=HTMLResponse)
    def browse(request: Request, table: str, sort: str = "", order: str = "desc", page: int = 0):
        user_of(request)
        ds = tables.dataset(table)
        schema = ds.schema
        labels = [c for c in LABELS if c in schema.names]
        sortable = [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]
        if sort and sort not in sortable:
            raise HTTPException(400, "not a score column")
        f = {c: request.query_params.get(c, "") for c in labels} | {"sort": sort, "order": order}
        conds = []
        for c in labels:
            v = f[c]
            if not v:
                continue
            if pa.types.is_boolean(schema.field(c).type):
                conds.append(f"{c} = {'true' if v == 'True' or v == 'true' else 'false'}")
            elif v == "None":
                conds.append(f"{c} IS NULL")
            else:
                conds.append(f"{c} = {_q(v)}")
        where = " AND ".join(conds) or None
        cols = [c for c in ["id", "caption", "caption_general", "dup_of", "semdup_of", *labels, *sortable]
                if c in schema.names]
        if sort:
            key = (table, ds.version, where, sort, order)
            if key not in tables.orders:
                t = ds.to_table(columns=[sort], filter=where, with_row_id=True)
                v = t[sort].to_numpy(zero_copy_only=False).astype(np.float64)
                v = np.where(np.isnan(v), -np.inf if order == "desc" else np.inf, v)
                idx = np.argsort(-v if order == "desc" else v, kind="stable")
                tables.orders[key] = t["_rowid"].to_numpy()[idx]
                while len(tables.orders) > 16:
                    tables.orders.popitem(last=False)
            ids = tables.orders[key][page * page_size:(page + 1) * page_size]
            t = ds._take_rows(ids.tolist(), columns=cols) if len(ids) else ds.schema.empty_table().select(cols)
            more = (page + 1) * page_size < len(tables.orders[key])
            rowids = ids.tolist()
        else:
            t = ds.to_table(columns=cols, filter=where, limit=page_size + 1, offset=page * page_size, with_row_id=True)
            more = t.num_rows > page_size
            t = t.slice(0, page_size)
            rowids = t["_rowid"].to_pylist()
        rows = t.to_pylist()
        if "image" in schema.names:
            tables.remember(table, ds.version, [r["id"] for r in rows], rowids)
        out = [{"id": r["id"], "caption": _caption_text(r), "survivor": r.get("dup_of") or r.get("semdup_of"),
                "labels": [(c, r[c]) for c in labels],
                "scores": [(c, f"{r[c]:.3g}" if isinstance(r[c], float) else r[c]) for c in sortable if r[c] is not None]}
               for r in rows]
        filters = {}
        for c in labels:  # choices from the first rows' values keep the page a bounded read
            sample = ds.to_table(columns=[c], limit=10_000)[c].to_pylist()
            filters[c] = sorted({str(v) for v in sample}, key=str)
        link = lambda p: f"/browse/{table}?" + urlencode({**f, "page": p})  # noqa: E731
        return show("browse", request, table=table, version=ds.version, rows=out, page=page, page_size=page_size,
                     filters=filters, f=f, sortable=sortable, prev=link(page - 1), next=link(page + 1), more=more)

    @app.get("/cluster/{table}/{row_id}", response_class=HTMLResponse)
    def cluster(request: Request, table: str, row_id: str):
        user_of(request)
        if not ID_RE.match(row_id):
            raise HTTPException(404, "no such row")
        ds = tables.dataset(table)
        cond = " OR ".join(f"{c} = {_q(row_id)}" for c in ("dup_of", "semdup_of") if c in ds.schema.names)
        members = ds.to_table(columns=[c for c in ("id", "caption", "reject_reason") if c in ds.schema.names],
                              filter=cond, limit=200).to_pylist() if cond else []
        return show("cluster", request, table=table, survivor=row_id, members=members)

    return app

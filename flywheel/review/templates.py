"""Server-rendered pages (Jinja2, autoescaped: captions and prompts are shown as text, never markup)."""

from __future__ import annotations

import jinja2

BASE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }} · flywheel review</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#111}
header{background:#1f2937;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cbd5e1;text-decoration:none} main{padding:16px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card img{max-width:100%;display:block;margin:auto} .meta{color:#555;font-size:12px}
.approve{border-left:4px solid #16a34a} .reject{border-left:4px solid #dc2626}
form.inline{display:inline} .pair{display:flex;gap:4px} .pair img{max-width:48%}
input,select{margin:2px}
</style></head><body>
<header><b>flywheel review</b>{% if user %}<a href="/queue">queue</a>
{% for t in tables %}<a href="/browse/{{ t }}">{{ t }}</a>{% endfor %}
<span style="margin-left:auto">{{ user }}</span>
<form class="inline" method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf }}">
<button id="logout">sign out</button></form>{% endif %}</header>
<main>{% block body %}{% endblock %}</main></body></html>"""

LOGIN = """{% extends "base" %}{% block body %}
<h2>Sign in</h2>{% if error %}<p style="color:#b91c1c">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="next" value="{{ next }}">
<p><label>Reviewer name <input id="reviewer" name="reviewer" required maxlength="64"></label></p>
<p><label>Token <input id="token" name="token" type="password" required></label></p>
<button id="signin">sign in</button></form>{% endblock %}"""

QUEUE = """{% extends "base" %}{% block body %}
<form method="get" action="/queue">
track <select name="track"><option value="">any</option>{% for v in choices.track %}
<option {% if f.track == v %}selected{% endif %}>{{ v }}</option>{% endfor %}</select>
category <select name="category"><option value="">any</option>{% for v in choices.category %}
<option {% if f.category == v %}selected{% endif %}>{{ v }}</option>{% endfor %}</select>
source <select name="source"><option value="">any</option>{% for v in choices.source %}
<option {% if f.source == v %}selected{% endif %}>{{ v }}</option>{% endfor %}</select>
show <select name="status">{% for v in ["open", "all", "approve", "reject"] %}
<option {% if f.status == v %}selected{% endif %}>{{ v }}</option>{% endfor %}</select>
<button>filter</button></form>
<p class="meta">{{ total }} items · page {{ page + 1 }}</p>
{% if items %}<form method="post" action="/review/page" id="page-form">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="back" value="{{ back }}">
{% for it in items %}<input type="hidden" name="item_ids" value="{{ it.item_id }}">{% endfor %}
<button name="decision" value="approve" id="approve-page">approve page</button>
<button name="decision" value="reject" id="reject-page">reject page</button></form>{% endif %}
<div class="grid">{% for it in items %}
<div class="card {{ it.decision or '' }}" id="item-{{ it.item_id }}">
{% if it.pool_id %}<div class="pair">{% if it.base_id %}<img src="/thumb/{{ it.pool }}/{{ it.base_id }}" alt="base">{% endif %}
<img src="/thumb/{{ it.pool }}/{{ it.pool_id }}" alt="{{ it.kind }}"></div>{% endif %}
<p class="text">{{ it.text }}</p>
<p class="meta">{{ it.kind }} · {{ it.track or "?" }} · {{ it.category or "no category" }} · {{ it.source }}
{% if it.similarity is not none %} · sim {{ "%.3f"|format(it.similarity) }}{% endif %}
{% if it.reject_reason %} · curated: {{ it.reject_reason }}{% endif %}</p>
<p class="meta">for case: {{ it.prompt }}</p>
{% if it.decision %}<p class="decision"><b>{{ {"approve": "approved", "reject": "rejected"}[it.decision] }}</b> by {{ it.reviewer }}</p>{% endif %}
<form class="inline" method="post" action="/review"><input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="item_id" value="{{ it.item_id }}"><input type="hidden" name="back" value="{{ back }}">
<button name="decision" value="approve" class="approve-btn">approve</button>
<button name="decision" value="reject" class="reject-btn">reject</button></form></div>
{% endfor %}</div>
<p>{% if page > 0 %}<a href="{{ prev }}">&larr; previous</a>{% endif %}
{% if more %}<a href="{{ next }}" id="next">next &rarr;</a>{% endif %}</p>{% endblock %}"""

BROWSE = """{% extends "base" %}{% block body %}
<h2>{{ table }} <span class="meta">version {{ version }}</span></h2>
<form method="get">{% for c, vals in filters.items() %}{{ c }}
<select name="{{ c }}"><option value="">any</option>{% for v in vals %}
<option {% if f[c] == v %}selected{% endif %}>{{ v }}</option>{% endfor %}</select>{% endfor %}
sort <select name="sort"><option value="">(table order)</option>{% for c in sortable %}
<option {% if f.sort == c %}selected{% endif %}>{{ c }}</option>{% endfor %}</select>
<select name="order"><option {% if f.order == "desc" %}selected{% endif %}>desc</option>
<option {% if f.order == "asc" %}selected{% endif %}>asc</option></select><button>apply</button></form>
<p class="meta">page {{ page + 1 }} · {{ page_size }} rows per page</p>
<div class="grid">{% for r in rows %}<div class="card">
<div class="pair"><img src="/thumb/{{ table }}/{{ r.id }}" alt="{{ r.id }}">
{% if r.survivor %}<a href="/cluster/{{ table }}/{{ r.survivor }}"><img src="/thumb/{{ table }}/{{ r.survivor }}" alt="survivor"></a>{% endif %}</div>
<p class="text">{{ r.caption }}</p>
<p class="meta">{{ r.id }}{% for k, v in r.labels %} · {{ k }}: {{ v }}{% endfor %}</p>
<p class="meta">{% for k, v in r.scores %}{{ k }} {{ v }} {% endfor %}</p></div>{% endfor %}</div>
<p>{% if page > 0 %}<a href="{{ prev }}">&larr; previous</a>{% endif %}
{% if more %}<a href="{{ next }}">next &rarr;</a>{% endif %}</p>{% endblock %}"""

CLUSTER = """{% extends "base" %}{% block body %}
<h2>dedup cluster of {{ survivor }} in {{ table }}</h2><div class="grid">
<div class="card approve"><img src="/thumb/{{ table }}/{{ survivor }}" alt="survivor"><p class="meta">survivor {{ survivor }}</p></div>
{% for r in members %}<div class="card reject"><img src="/thumb/{{ table }}/{{ r.id }}" alt="{{ r.id }}">
<p class="meta">{{ r.id }} · {{ r.reject_reason }}</p><p class="text">{{ r.caption }}</p></div>{% endfor %}</div>{% endblock %}"""

ENV = jinja2.Environment(loader=jinja2.DictLoader({"base": BASE, "login": LOGIN, "queue": QUEUE, "browse": BROWSE,
                                                   "cluster": CLUSTER}),
                         autoescape=True, undefined=jinja2.StrictUndefined)


def render(name: str, **ctx) -> str:
    ctx.setdefault("user", None)
    ctx.setdefault("csrf", "")
    ctx.setdefault("tables", [])
    return ENV.get_template(name).render(title=name, **ctx)

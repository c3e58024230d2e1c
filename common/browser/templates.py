"""The HTML, CSS and JavaScript of the browser's pages (Jinja2 templates, everything inline).

An SAE page holds its latents as one JSON document (``<script type="application/json">``) and a
small script renders the list and the selected latent's panel from it, so a page is a single
file that opens from disk with no server, no CDN and no network request. ``#latent-<id>`` in the
address selects a latent (links to a latent work).
"""

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e2e2e6; --accent:#c2410c; --bg:#fafafa; }
* { box-sizing: border-box; }
body { margin:0; height:100vh; display:flex; flex-direction:column;
       font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:10px 18px; border-bottom:1px solid var(--line); background:#fff; }
header h1 { font-size:18px; margin:0 0 2px; }
header .meta { color:var(--muted); font-size:12px; }
a { color:#1d4ed8; text-decoration:none; } a:hover { text-decoration:underline; }
#app { display:flex; flex:1; min-height:0; }
#side { width:300px; min-width:220px; border-right:1px solid var(--line); background:#fff;
        display:flex; flex-direction:column; }
#side input, #side select { margin:8px; padding:5px 7px; border:1px solid var(--line);
        border-radius:5px; font:inherit; }
#list { overflow-y:auto; flex:1; margin:0; padding:0; list-style:none; }
#list li { padding:6px 10px; border-bottom:1px solid #f0f0f2; cursor:pointer; }
#list li:hover { background:#f5f5f7; }
#list li.sel { background:#fff3e8; border-left:3px solid var(--accent); padding-left:7px; }
#list .id { font-weight:600; } #list .f { color:var(--muted); font-size:12px; float:right; }
#list .e { display:block; color:var(--muted); font-size:12px; white-space:nowrap;
           overflow:hidden; text-overflow:ellipsis; }
#panel { flex:1; overflow-y:auto; padding:14px 22px 40px; }
#panel h2 { margin:0 0 6px; font-size:20px; }
.expl { font-size:15px; margin:4px 0 10px; } .expl.none { color:var(--muted); font-style:italic; }
.row { display:flex; gap:28px; flex-wrap:wrap; align-items:flex-start; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 12px;
        margin:10px 0; }
.card h3 { font-size:13px; margin:0 0 6px; text-transform:uppercase; letter-spacing:.04em;
           color:var(--muted); }
table.s { border-collapse:collapse; font-size:13px; }
table.s td, table.s th { padding:2px 10px 2px 0; text-align:left; }
.ctx { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12.5px;
       white-space:pre-wrap; padding:3px 0; border-bottom:1px dashed #eee; }
.ctx .mx { color:var(--muted); display:inline-block; width:58px; }
.tok { border-radius:2px; }
.logits { font-family:ui-monospace, monospace; font-size:12.5px; }
.logits .v { color:var(--muted); }
.imgs { display:flex; flex-wrap:wrap; gap:10px; }
.imgs figure { margin:0; text-align:center; font-size:11px; color:var(--muted); }
.imgs .pair { position:relative; width:112px; height:112px; }
.imgs .pair img { position:absolute; left:0; top:0; width:112px; height:112px;
                  image-rendering:pixelated; }
.imgs .pair .ov { transition:opacity .15s; } .imgs .pair:hover .ov { opacity:0; }
ul.links li { margin:4px 0; }
"""

SAE_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
<style>{{ css }}</style>
</head>
<body>
<header>
  <h1>{{ title }}</h1>
  <div class="meta">{% if index_href %}<a href="{{ index_href }}">&larr; index</a>
  &middot; {% endif %}
  {{ n_latents }} latents shown{% for k, v in meta %} &middot; {{ k }}: {{ v }}{% endfor %}</div>
</header>
<div id="app">
  <nav id="side">
    <input id="filter" type="search" placeholder="filter: id or words of the explanation">
    <select id="sort">
      <option value="id">sort by id</option>
      <option value="freq">sort by firing frequency</option>
      <option value="score">sort by detection AUROC</option>
    </select>
    <ul id="list"></ul>
  </nav>
  <main id="panel"><p>Select a latent.</p></main>
</div>
<script type="application/json" id="data">{{ data }}</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const byId = new Map(D.latents.map(function (l) { return [String(l.id), l]; }));
  const list = document.getElementById("list");
  const panel = document.getElementById("panel");
  const filter = document.getElementById("filter");
  const sort = document.getElementById("sort");

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function fmt(x, d) { return (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d); }
  function pct(f) {
    if (!f) return "never";
    return (100 * f).toPrecision(2) + "% (1 in " + Math.round(1 / f).toLocaleString() + ")";
  }
  function detScore(l) {
    const s = l.scores && l.scores.real && l.scores.real.detection;
    return s ? s.auroc : null;
  }

  function renderList() {
    const q = filter.value.trim().toLowerCase();
    let items = D.latents.filter(function (l) {
      return !q || String(l.id) === q || (l.expl || "").toLowerCase().indexOf(q) >= 0;
    });
    const key = sort.value;
    items = items.slice().sort(function (a, b) {
      if (key === "freq") return b.freq - a.freq;
      if (key === "score") return (detScore(b) || -1) - (detScore(a) || -1);
      return a.id - b.id;
    });
    list.textContent = "";
    items.forEach(function (l) {
      const li = el("li");
      li.dataset.id = String(l.id);
      li.appendChild(el("span", "id", "#" + l.id));
      li.appendChild(el("span", "f", (100 * l.freq).toPrecision(2) + "%"));
      li.appendChild(el("span", "e", l.expl || ""));
      li.addEventListener("click", function () { location.hash = "latent-" + l.id; });
      list.appendChild(li);
    });
    markSelected();
  }
  function markSelected() {
    const id = current();
    Array.prototype.forEach.call(list.children, function (li) {
      li.classList.toggle("sel", li.dataset.id === id);
    });
  }
  function current() {
    const m = /^#latent-(.+)$/.exec(location.hash);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function context(c, max, thr) {
    const div = el("div", "ctx");
    div.appendChild(el("span", "mx", fmt(Math.max.apply(null, c.a), 2)));
    c.t.forEach(function (tok, i) {
      const a = c.a[i];
      const s = el("span", "tok", tok.replace(/\\n/g, "\\u21b5"));
      if (a > thr && max > 0) {
        const alpha = Math.min(1, a / max);
        s.style.background = "rgba(234, 88, 12, " + (0.12 + 0.78 * alpha).toFixed(3) + ")";
      }
      s.title = "activation " + fmt(a, 3);
      div.appendChild(s);
    });
    return div;
  }
  function card(title) {
    const c = el("div", "card");
    c.appendChild(el("h3", null, title));
    return c;
  }
  function histogram(l) {
    const c = card("activation histogram (" + (l.images ? "patches" : "tokens") + " above 0)");
    const counts = l.hist || [];
    if (!counts.length) { c.appendChild(el("p", null, "no activation")); return c; }
    const ns = "http://www.w3.org/2000/svg";
    const W = 360, H = 90, n = counts.length, top = Math.max.apply(null, counts);
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
    counts.forEach(function (v, i) {
      const r = document.createElementNS(ns, "rect");
      const h = top > 0 ? Math.max(v > 0 ? 1 : 0, H * Math.log1p(v) / Math.log1p(top)) : 0;
      r.setAttribute("x", (i * W / n).toFixed(1)); r.setAttribute("width", (W / n - 1).toFixed(1));
      r.setAttribute("y", (H - h).toFixed(1)); r.setAttribute("height", h.toFixed(1));
      r.setAttribute("fill", "#ea580c");
      const t = document.createElementNS(ns, "title");
      t.textContent = v + " tokens"; r.appendChild(t);
      svg.appendChild(r);
    });
    [[0, "start", l.edges[0]], [W, "end", l.edges[1]]].forEach(function (p) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", p[0]); t.setAttribute("y", H + 13); t.setAttribute("font-size", "11");
      t.setAttribute("text-anchor", p[1]); t.setAttribute("fill", "#6b6b70");
      t.textContent = fmt(p[2], 2); svg.appendChild(t);
    });
    c.appendChild(svg);
    c.appendChild(el("div", "meta", "log-scaled counts"));
    return c;
  }
  function scores(l) {
    const c = card("explanation scores (AUROC / balanced accuracy)");
    const t = el("table", "s");
    const head = el("tr");
    ["explanation", "detection", "fuzzing", "detection vs close negatives"].forEach(function (h) {
      head.appendChild(el("th", null, h));
    });
    t.appendChild(head);
    Object.keys(l.scores).forEach(function (kind) {
      const tr = el("tr");
      const s = l.scores[kind];
      tr.appendChild(el("td", null, kind));
      ["detection", "fuzzing"].forEach(function (sc) {
        const v = s[sc];
        const txt = v ? fmt(v.auroc, 2) + " / " + fmt(v.balanced_accuracy, 2) : "n/a";
        tr.appendChild(el("td", null, txt));
      });
      tr.appendChild(el("td", null, s.detection ? fmt(s.detection.auroc_close, 2) : "n/a"));
      t.appendChild(tr);
    });
    c.appendChild(t);
    return c;
  }
  function logits(l) {
    const c = card("output tokens (decoder direction through the unembedding)");
    const row = el("div", "row");
    [["promoted", l.logits.p], ["suppressed", l.logits.s]].forEach(function (p) {
      const col = el("div", "logits");
      col.appendChild(el("b", null, p[0]));
      p[1].forEach(function (tv) {
        const line = el("div");
        line.appendChild(el("span", null, JSON.stringify(tv[0]) + " "));
        line.appendChild(el("span", "v", fmt(tv[1], 2)));
        col.appendChild(line);
      });
      row.appendChild(col);
    });
    c.appendChild(row);
    return c;
  }
  function images(l) {
    const c = card("top images (hover: without heat-map)");
    const box = el("div", "imgs");
    l.images.forEach(function (im) {
      const f = el("figure");
      const pair = el("div", "pair");
      const a = el("img"); a.src = im.img; a.alt = "image " + im.i;
      const b = el("img", "ov"); b.src = im.ov; b.alt = "heat-map " + im.i;
      pair.appendChild(a); pair.appendChild(b); f.appendChild(pair);
      f.appendChild(el("figcaption", null, "#" + im.i + " max " + fmt(im.a, 2)));
      box.appendChild(f);
    });
    c.appendChild(box);
    return c;
  }

  function show(id) {
    const l = byId.get(String(id));
    panel.textContent = "";
    if (!l) { panel.appendChild(el("p", null, "Select a latent.")); return; }
    panel.appendChild(el("h2", null, "Latent " + l.id + (l.method ? " (" + l.method + ")" : "")));
    panel.appendChild(el("p", l.expl ? "expl" : "expl none", l.expl || "no explanation yet"));
    const stats = card("statistics");
    const t = el("table", "s");
    [["firing frequency", pct(l.freq)], ["max activation", fmt(l.max, 3)]].concat(
      l.note ? [["note", l.note]] : []).forEach(function (kv) {
      const tr = el("tr");
      tr.appendChild(el("td", null, kv[0])); tr.appendChild(el("td", null, kv[1]));
      t.appendChild(tr);
    });
    stats.appendChild(t);
    const row = el("div", "row");
    row.appendChild(stats);
    row.appendChild(histogram(l));
    panel.appendChild(row);
    if (l.scores) panel.appendChild(scores(l));
    if (l.logits) panel.appendChild(logits(l));
    if (l.images && l.images.length) panel.appendChild(images(l));
    [["top contexts", l.top], ["contexts across activation quantiles", l.quant],
     ["close negatives (share tokens, do not fire)", l.close]].forEach(function (s) {
      if (!s[1] || !s[1].length) return;
      const c = card(s[0]);
      s[1].forEach(function (ctx) { c.appendChild(context(ctx, l.max, l.thr || 0)); });
      panel.appendChild(c);
    });
    markSelected();
  }

  filter.addEventListener("input", renderList);
  sort.addEventListener("change", renderList);
  window.addEventListener("hashchange", function () { show(current()); });
  renderList();
  if (!current() && D.latents.length) {
    history.replaceState(null, "", "#latent-" + D.latents[0].id);
  }
  show(current());
})();
</script>
</body>
</html>
"""

INDEX_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
<style>{{ css }} main { padding:14px 22px; max-width:900px; }</style>
</head>
<body>
<header><h1>{{ title }}</h1><div class="meta">{{ subtitle }}</div></header>
<main>
{% if pages %}<div class="card"><h3>SAE feature pages</h3><ul class="links" id="pages">
{% for p in pages %}<li><a href="{{ p.href }}">{{ p.name }}</a>
<span class="meta"> &middot; {{ p.summary }}</span></li>
{% endfor %}</ul></div>{% endif %}
{% if notebooks %}<div class="card"><h3>executed notebooks</h3><ul class="links" id="notebooks">
{% for n in notebooks %}<li><a href="{{ n.href }}">{{ n.name }}</a></li>
{% endfor %}</ul></div>{% endif %}
</main>
</body>
</html>
"""

"""The network page served at ``/``: one self-contained HTML document (no CDN, no external file).

It holds no data itself: a small script polls ``/v1/p2pinfer/network`` every two seconds and draws the peers,
the recent requests (a ranking bar per election: each bidder's VRF output on [0, 1), lowest executes), the
verdicts and this peer's ledger (a sparkline of its balance). Everything shown comes from other parties'
announcements and messages, so the script only ever sets ``textContent`` and SVG attributes, never HTML.
With a gateway key, open ``/#key=KEY``: the fragment stays in the browser and is sent as the bearer token.
"""

from __future__ import annotations

POLL_MS = 2000

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>p2pinfer network</title>
<link rel="icon" href="data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Ccircle cx='8' cy='8' r='6' fill='%231f6feb'/%3E%3C/svg%3E">
<style>
  :root { --ink:#1d2430; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --card:#fff; --exec:#1f6feb;
          --ver:#8250df; --bid:#98a2b3; --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--ink);
         background:var(--bg); }
  header { display:flex; gap:16px; align-items:baseline; flex-wrap:wrap; padding:14px 24px; background:var(--card);
           border-bottom:1px solid var(--line); }
  header h1 { font-size:18px; margin:0; }
  .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
  .muted { color:var(--muted); }
  main { display:grid; grid-template-columns: minmax(320px, 1fr) minmax(420px, 2fr); gap:16px; padding:16px 24px; }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  section h2 { font-size:15px; margin:0 0 10px; }
  main > div { display:flex; flex-direction:column; gap:16px; }
  [hidden] { display:none !important; }
  table { border-collapse:collapse; width:100%; }
  th, td { text-align:left; padding:5px 6px; border-bottom:1px solid var(--line); vertical-align:top; }
  th { font-weight:600; color:var(--muted); font-size:12px; }
  .you { font-weight:600; color:var(--exec); }
  .badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
           background:#eef1f5; }
  .badge.accepted, .badge.accept { background:#dafbe1; color:var(--ok); }
  .badge.rejected, .badge.reject { background:#ffebe9; color:var(--bad); }
  .badge.unverified, .badge.none, .badge.skipped { background:#fff8c5; color:var(--warn); }
  .badge.failed { background:#ffebe9; color:var(--bad); }
  .big { font-size:28px; font-weight:700; }
  .request { border:1px solid var(--line); border-radius:8px; padding:10px 12px; margin-bottom:10px; }
  .request .head { display:flex; gap:10px; flex-wrap:wrap; align-items:center; }
  .verdicts { margin:6px 0 0; padding:0; list-style:none; }
  .verdicts li { padding:2px 0; }
  .legend span { margin-right:12px; }
  .dot { display:inline-block; width:9px; height:9px; border-radius:50%; margin-right:4px; }
  #live.stale { color:var(--bad); }
  @media (max-width: 900px) { main { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1>p2pinfer network</h1>
  <span>seen from <span id="me" class="mono you">…</span> <span id="role" class="muted"></span></span>
  <span id="live" class="muted">connecting…</span>
</header>
<main>
  <div>
    <section id="ledger">
      <h2>Your ledger</h2>
      <div><span id="balance" class="big">–</span> <span id="unit" class="muted"></span></div>
      <div id="totals" class="muted"></div>
      <svg id="sparkline" width="100%" height="56" viewBox="0 0 300 56" preserveAspectRatio="none"
           role="img" aria-label="balance over time"></svg>
      <p id="about" class="muted" style="font-size:12px"></p>
      <table><thead><tr><th>when</th><th>entry</th><th>amount</th></tr></thead><tbody id="entries"></tbody></table>
    </section>
    <section id="peers">
      <h2>Peers <span id="peer-count" class="muted"></span></h2>
      <table><thead><tr><th>peer</th><th>models</th><th>slots free</th><th>reachability</th><th>reputation</th></tr>
      </thead><tbody id="peer-rows"></tbody></table>
    </section>
  </div>
  <section id="requests">
    <h2>Recent requests <span id="request-count" class="muted"></span></h2>
    <div class="legend muted" style="font-size:12px;margin-bottom:8px">
      Ranking bar: each bidder's VRF output on [0, 1), re-checked here; the lowest executes, the next verify.
      <span><i class="dot" style="background:var(--exec)"></i>executor</span>
      <span><i class="dot" style="background:var(--ver)"></i>verifier</span>
      <span><i class="dot" style="background:var(--bid)"></i>other bidder</span>
    </div>
    <div id="request-list"><p class="muted">No request yet.</p></div>
  </section>
</main>
<script>
"use strict";
const POLL_MS = __POLL_MS__;
const SVG = "http://www.w3.org/2000/svg";
const key = new URLSearchParams(location.hash.slice(1)).get("key");
let myId = null, lastOk = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
function short(id) { return id && id.length > 20 ? id.slice(0, 8) + "…" + id.slice(-6) : (id || "–"); }
function who(id) {
  const span = el("span", {class: "mono" + (id === myId ? " you" : ""), title: id || ""}, short(id));
  if (id === myId) span.append(" (you)");
  return span;
}
function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return new Date(ms).toLocaleString();
}
function plural(n, word, many) { return n + " " + (n === 1 ? word : many || word + "s"); }
function credits(n) { return (n > 0 ? "+" : n < 0 ? "\\u2212" : "") + plural(Math.abs(n), "credit"); }

function drawSparkline(series) {
  const box = document.getElementById("sparkline");
  box.replaceChildren();
  if (series.length === 0) {
    const t = svg("text", {x: 4, y: 32, fill: "#667085", "font-size": 12});
    t.textContent = "no entry yet";
    box.append(t);
    return;
  }
  const values = [0, ...series.map(p => p.balance)];
  const lo = Math.min(...values), hi = Math.max(...values), span = (hi - lo) || 1;
  const x = i => 2 + (296 * i) / Math.max(1, values.length - 1);
  const y = v => 52 - (48 * (v - lo)) / span;
  const points = values.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
  box.append(svg("line", {x1: 0, x2: 300, y1: y(0), y2: y(0), stroke: "#e4e7ec"}));
  box.append(svg("polyline", {points, fill: "none", stroke: "#1f6feb", "stroke-width": 2,
                              "vector-effect": "non-scaling-stroke"}));
}

function rankingBar(election) {
  // Percent coordinates on an unscaled SVG keep the dots round at any width.
  const box = svg("svg", {width: "100%", height: 24, class: "ranking", role: "img", "aria-label": "VRF ranking"});
  box.append(svg("line", {x1: "1%", x2: "99%", y1: 12, y2: 12, stroke: "#d0d5dd", "stroke-width": 2}));
  const colors = {executor: "#1f6feb", verifier: "#8250df", bidder: "#98a2b3"};
  for (const r of [...election.ranking].reverse()) {
    const c = svg("circle", {cx: (1 + 98 * r.position).toFixed(2) + "%", cy: 12, r: r.role === "bidder" ? 5 : 7,
                             fill: colors[r.role] || "#98a2b3", stroke: "#fff", "stroke-width": 1.5});
    const title = svg("title", {});
    title.textContent = "#" + (r.rank + 1) + " " + r.peer_id + " (" + r.role + ") VRF output " + r.output + "…";
    c.append(title);
    box.append(c);
  }
  const names = el("div", {class: "muted", style: "font-size:12px"});
  election.ranking.forEach((r, i) => {
    names.append(i ? ", " : "", "#" + (r.rank + 1) + " ", who(r.peer_id), " " + r.role + " (" + r.position.toFixed(3) + ")");
  });
  return el("div", {}, box, names);
}

function verdictSummary(v) {
  if (v.verdict === "accept") return "re-computed the fingerprints; largest deviation " + Number(v.max_deviation).toExponential(2) + " nats";
  return v.verdict === "none" ? "no verdict counted" : "rejected";
}

function renderRequest(r) {
  const card = el("div", {class: "request", "data-request-id": r.request_id});
  const known = ["accepted", "rejected", "unverified", "skipped", "unknown"].includes(r.outcome);
  const outcome = el("span", {class: "badge outcome " + (known ? "" : "failed ") + r.outcome},
                     r.outcome === "unknown" ? "outcome not told" : known ? r.outcome : r.outcome.replace(/_/g, " "));
  card.append(el("div", {class: "head"}, outcome, el("b", {}, r.model),
    el("span", {class: "muted"}, r.tokens === null ? "" : plural(r.tokens, "token")), el("span", {class: "muted"}, ago(r.at_ms)),
    el("span", {class: "muted"}, "you were the " + (r.role === "named" ? "peer named" : r.role)),
    el("span", {class: "mono muted", title: r.request_id}, "request " + r.request_id.slice(0, 12) + "…")));
  const e = r.election;
  if (e.proof === "none") {
    card.append(el("div", {class: "muted election"}, "no result: " + r.outcome.replace(/_/g, " ") +
                   (r.executor ? " (last executor tried: " + short(r.executor) + ")" : "")));
    return card;
  }
  if (r.executor) card.append(el("div", {}, "executed by ", who(r.executor)));
  else card.append(el("div", {}, "requested by ", who(r.client), el("span", {class: "muted"},
                      " (this peer bid; the receipt goes to the executor and verifiers only)")));
  if (e.proof === "not-seen") {
    card.append(el("div", {class: "muted election"}, "election: this peer did not see the bids (its receipt carries no signed bid set)"));
  } else {
    const valid = e.ranking.length;
    const text = e.proof === "checked"
      ? "election: " + plural(valid, "VRF proof") + " checked here, all valid"
      : "election: " + valid + " of " + e.bids + " proofs valid; " + e.invalid_bids.length + " rejected";
    const left = e.excluded ? "; " + plural(e.excluded, "bidder") + " left out by the client's signed exclusions" : "";
    card.append(el("div", {class: "election"}, el("span", {class: "badge " + (e.proof === "checked" ? "accept" : "reject")},
                                                    e.proof === "checked" ? "proofs checked" : "invalid bids"),
                   " ", text + left));
    card.append(rankingBar(e));
  }
  if (r.via === "bid-set") return card;  // a bidder is told the election, not the verdicts
  const list = el("ul", {class: "verdicts"});
  if (r.verdicts.length === 0) list.append(el("li", {class: "muted"}, "no verifier was asked (no other peer serves this model)"));
  for (const v of r.verdicts) {
    const li = el("li", {class: "verdict", "data-verdict": v.verdict}, el("span", {class: "badge " + v.verdict}, v.verdict),
                  " ", who(v.peer_id), ": ", el("span", {class: "reason"}, v.reason || verdictSummary(v)));
    if (v.verdict === "reject" && v.first_bad_position !== null && v.first_bad_position !== undefined)
      li.append(el("span", {class: "muted"}, " (first bad token at position " + v.first_bad_position + ")"));
    list.append(li);
  }
  card.append(list);
  return card;
}

function render(data) {
  myId = data.peer.peer_id;
  document.getElementById("me").textContent = short(myId) + " (you)";
  document.getElementById("me").title = myId;
  document.getElementById("role").textContent = data.peer.role + ", p2pinfer " + data.peer.version;

  const ledger = data.ledger;
  if (ledger) {
    document.getElementById("balance").textContent = ledger.balance;
    document.getElementById("unit").textContent = (Math.abs(ledger.balance) === 1 ? ledger.unit : ledger.unit + "s") + " balance";
    document.getElementById("totals").textContent = "earned " + credits(ledger.credits) + ", penalties " +
      credits(-ledger.penalties) + " over " + plural(ledger.series.length, "entry", "entries");
    document.getElementById("about").textContent = ledger.about;
    drawSparkline(ledger.series);
    document.getElementById("entries").replaceChildren(...ledger.entries.map(e =>
      el("tr", {}, el("td", {class: "muted"}, ago(e.at_ms)), el("td", {}, e.kind, e.note ? el("span", {class: "muted"}, " " + e.note) : ""),
         el("td", {}, credits(e.amount)))));
  }
  // A bootstrap node keeps no ledger and takes part in no request: say so instead of drawing empty boxes.
  document.getElementById("ledger").hidden = !ledger;

  document.getElementById("peer-count").textContent = "(" + data.peers.length + ")";
  document.getElementById("peer-rows").replaceChildren(...data.peers.map(p => {
    const rep = p.reputation;
    const repText = p.you ? "–" : !rep ? "n/a" : rep.score.toFixed(2) + (rep.proven_fraud ? " (proven fraud)" : rep.excluded ? " (excluded)" : "");
    return el("tr", {class: "peer", "data-peer-id": p.peer_id}, el("td", {}, who(p.peer_id)),
      el("td", {}, p.models.map(m => m.name).join(", ") || (p.role === "bootstrap" ? "(bootstrap node)" : "–")),
      el("td", {}, p.total_slots === null ? "–" : p.free_slots + " of " + p.total_slots),
      el("td", {}, p.reachability, el("div", {class: "muted", style: "font-size:12px", title: p.addrs.join(", ")},
                                      p.addresses + " address" + (p.addresses === "none" ? "" : "es"))),
      el("td", {}, repText));
  }));

  document.getElementById("request-count").textContent = "(" + data.requests.length + ")";
  const list = document.getElementById("request-list");
  if (data.requests.length) list.replaceChildren(...data.requests.map(renderRequest));
  else list.replaceChildren(el("p", {class: "muted"}, data.peer.role === "bootstrap"
    ? "A bootstrap node relays gossip and answers the DHT; it takes part in no request, so none is listed here."
    : "No request yet."));
}

async function poll() {
  try {
    const response = await fetch("/v1/p2pinfer/network", {headers: key ? {authorization: "Bearer " + key} : {},
                                                           cache: "no-store"});
    if (!response.ok) throw new Error("the peer answered " + response.status + (response.status === 401 ? ": open /#key=YOUR_GATEWAY_KEY" : ""));
    render(await response.json());
    lastOk = Date.now();
    document.getElementById("live").textContent = "live, updated " + new Date().toLocaleTimeString();
    document.getElementById("live").className = "muted";
  } catch (err) {
    document.getElementById("live").textContent = "not updating: " + err.message;
    document.getElementById("live").className = "stale";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
</script>
</body>
</html>
""".replace("__POLL_MS__", str(POLL_MS))

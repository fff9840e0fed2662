// Airlock's review page: vanilla JavaScript over the JSON API (docs/review-api.md).
//
// Everything shown here was written by an agent and is hostile: it is rendered only
// with text nodes and attribute values (never innerHTML), and the server's
// Content-Security-Policy forbids inline code and styles besides. Views follow the
// URL fragment: #/ (pending), #/intent/<id>, #/runs, #/run/<run>. Changes arrive
// over server-sent events (/v1/events), with polling as the fallback.
"use strict";

(() => {
  // ---------------------------------------------------------------------------
  // State

  /** The signed-in reviewer, `{name, role, csrf}`, or null. */
  let session = null;
  /** The route on screen, so a refresh can tell a new view from the same one. */
  let shownRoute = null;
  /** Bumped by every render: answers that arrive for an older render are dropped. */
  let renderSeq = 0;
  /** Nodes kept across refreshes of one view (forms being filled in), by key. */
  let kept = new Map();
  /** The preview digest shown under Changes, by intent id: an approval binds the rows shown. */
  const shownPreview = new Map();
  /** Which <details> the reviewer folded or unfolded, by key, so refreshes keep them. */
  const foldState = new Map();
  /** A message about the last action, shown on the view it was made on. */
  let flash = null;

  const POLL_MS = 3000;
  const DEBOUNCE_MS = 200;
  let events = null;
  let pollTimer = null;
  let refreshTimer = null;

  const main = document.getElementById("main");

  // ---------------------------------------------------------------------------
  // DOM helpers: every string becomes a text node.

  /**
   * Makes an element. `attrs`: `class`, `testid` (data-testid), `data` (dataset
   * entries), `on` (event listeners), `hidden`/`disabled`/`checked`/`value`, and
   * other plain attributes. Children: nodes, strings (as text), null (skipped),
   * arrays (flattened).
   */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "testid") el.dataset.testid = value;
      else if (key === "data") Object.assign(el.dataset, value);
      else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
      else if (key === "hidden" || key === "disabled" || key === "checked") el[key] = true;
      else if (key === "value") el.value = value;
      else if (key.startsWith("on")) throw new Error("use the `on` map for listeners");
      else el.setAttribute(key, String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else if (child instanceof Node) el.appendChild(child);
      else el.appendChild(document.createTextNode(String(child)));
    }
  }

  /** Replaces `parent`'s children with `next`, leaving in place (focused, filled in)
   * the nodes both lists share. */
  function patchChildren(parent, nodes) {
    const next = nodes.filter((n) => n instanceof Node);
    const keep = new Set(next);
    for (const child of [...parent.childNodes]) if (!keep.has(child)) child.remove();
    let cursor = parent.firstChild;
    for (const node of next) {
      if (node === cursor) {
        cursor = cursor.nextSibling;
      } else {
        parent.insertBefore(node, cursor);
      }
    }
  }

  /** A node built once per view and key, then kept across refreshes. */
  function keep(key, build) {
    if (!kept.has(key)) kept.set(key, build());
    return kept.get(key);
  }

  function details(key, summary, testid, openByDefault, ...content) {
    const open = foldState.has(key) ? foldState.get(key) : openByDefault;
    const el = h("details", { class: "fold", testid, open: open ? "" : null },
      h("summary", {}, summary), ...content);
    el.addEventListener("toggle", () => foldState.set(key, el.open));
    return el;
  }

  const intentHref = (id) => "#/intent/" + encodeURIComponent(id);
  const runHref = (run) => "#/run/" + encodeURIComponent(run);

  // ---------------------------------------------------------------------------
  // Formatting

  function parseTime(iso) {
    if (typeof iso !== "string" || iso === "") return null;
    const t = new Date(iso);
    return Number.isNaN(t.getTime()) ? null : t;
  }

  function relative(t, now) {
    const secs = Math.round((t.getTime() - now) / 1000);
    const abs = Math.abs(secs);
    let text;
    if (abs < 60) text = abs + " s";
    else if (abs < 3600) text = Math.round(abs / 60) + " min";
    else if (abs < 86400) text = (abs / 3600).toFixed(abs < 36000 ? 1 : 0) + " h";
    else text = (abs / 86400).toFixed(abs < 864000 ? 1 : 0) + " d";
    return secs < 0 ? text + " ago" : "in " + text;
  }

  /** A time given by the API, formatted locally, with the ISO string as a tooltip. */
  function time(iso) {
    const t = parseTime(iso);
    if (!t) return h("span", { class: "muted" }, iso == null ? "—" : String(iso));
    return h("time", { datetime: iso, title: iso }, t.toLocaleString());
  }

  /** "5 min ago" / "in 40 min", kept current by a timer (see tickRelative). */
  function rel(iso, opts = {}) {
    const t = parseTime(iso);
    if (!t) return h("span", { class: "muted" }, "—");
    const el = h("span", { class: "rel", title: t.toLocaleString(), data: { at: iso, kind: opts.kind || "" } });
    updateRel(el, Date.now());
    return el;
  }

  function updateRel(el, now) {
    const t = parseTime(el.dataset.at);
    if (!t) return;
    if (el.dataset.kind === "deadline") {
      const left = t.getTime() - now;
      el.textContent = left <= 0 ? "passed " + relative(t, now) : relative(t, now);
      el.classList.toggle("urgent", left < 10 * 60 * 1000);
    } else {
      el.textContent = relative(t, now);
    }
  }

  function tickRelative() {
    const now = Date.now();
    for (const el of document.querySelectorAll(".rel")) updateRel(el, now);
  }

  /** One JSON value as text: strings as they are, null marked, the rest as JSON. */
  function value(v) {
    if (v === null || v === undefined) return h("span", { class: "null" }, "NULL");
    if (typeof v === "string") return v === "" ? h("span", { class: "muted" }, "(empty text)") : v;
    return JSON.stringify(v);
  }

  const json = (v) => JSON.stringify(v);

  const STATES = {
    received: "neutral", queued: "neutral", awaiting_review: "wait", approved: "ok",
    applied: "ok", undone: "neutral", invalid: "bad", denied: "bad",
    rejected: "bad", expired: "bad", failed: "bad",
  };

  function stateBadge(state) {
    const kind = STATES[state] || "neutral";
    const label = String(state || "unknown").replace(/_/g, " ");
    return h("span", { class: "badge badge-" + kind, testid: "state", data: { state: String(state) } }, label);
  }

  function verdictBadge(verdict) {
    const kind = { allow: "ok", deny: "bad", review: "wait", approve: "ok", reject: "bad" }[verdict] || "neutral";
    return h("span", { class: "badge badge-" + kind }, String(verdict));
  }

  function progress(review) {
    if (!review) return h("span", { class: "muted" }, "—");
    return h("span", { class: "progress", testid: "review-progress" },
      String(review.approvals) + " of " + String(review.needed) + " approvals");
  }

  function reasonsList(reasons, testid) {
    if (!Array.isArray(reasons) || reasons.length === 0) return h("span", { class: "muted" }, "none given");
    return h("ul", { class: "reasons", testid }, reasons.map((r) => h("li", {}, String(r))));
  }

  function errorBox(message, testid = "error") {
    return h("div", { class: "notice notice-bad", role: "alert", testid }, h("strong", {}, "Error: "), message);
  }

  function countsBadges(counts) {
    const entries = Object.entries(counts || {}).filter(([, n]) => n > 0);
    if (entries.length === 0) return h("span", { class: "muted" }, "no intents");
    return h("span", { class: "counts", testid: "counts" },
      entries.map(([state, n]) => h("span", { class: "badge badge-" + (STATES[state] || "neutral"), data: { state } },
        state.replace(/_/g, " ") + " " + n)));
  }

  // ---------------------------------------------------------------------------
  // The API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (method !== "GET" && session && session.csrf) headers["X-Airlock-CSRF"] = session.csrf;
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "network", "the review endpoint could not be reached (" + e.message + ")");
    }
    let data = null;
    const text = await response.text();
    if (text !== "") {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!response.ok) {
      const err = data && data.error ? data.error : {};
      const retry = response.headers.get("Retry-After");
      let message = typeof err.message === "string" && err.message !== ""
        ? err.message : response.status + " " + response.statusText;
      if (response.status === 429 && retry) message += " (try again in " + retry + " s)";
      throw new ApiError(response.status, err.code || "http_" + response.status, message);
    }
    return data;
  }

  /** Handles an API failure in a view: a 401 means the session is gone. */
  function failed(e) {
    if (e instanceof ApiError && e.status === 401) {
      signedOut("Your session has ended; sign in again.");
      return null;
    }
    return errorBox(e.message);
  }

  // ---------------------------------------------------------------------------
  // Session

  function showSession() {
    const box = document.querySelector('[data-testid="session"]');
    const nav = document.querySelector('[data-testid="nav"]');
    if (session) {
      document.querySelector('[data-testid="whoami"]').replaceChildren(
        "Signed in as ", h("strong", { testid: "whoami-name" }, session.name), " ",
        h("span", { class: "role role-" + session.role, testid: "whoami-role" }, session.role));
      box.hidden = false;
      nav.hidden = false;
    } else {
      box.hidden = true;
      nav.hidden = true;
    }
  }

  const canDecide = () => session && (session.role === "approver" || session.role === "admin");
  const canUndo = () => session && session.role === "admin";

  function signedOut(message) {
    session = null;
    stopLive();
    kept = new Map();
    shownRoute = null;
    showSession();
    renderSignIn(message);
  }

  function renderSignIn(message) {
    renderSeq += 1;
    const input = h("input", {
      type: "password", id: "token", name: "token", autocomplete: "current-password",
      required: "", spellcheck: "false", testid: "token",
    });
    const status = h("div", { class: "form-status", role: "status", testid: "sign-in-status" });
    if (message) status.replaceChildren(h("div", { class: "notice notice-info" }, message));
    const submit = h("button", { type: "submit", class: "btn btn-primary", testid: "sign-in" }, "Sign in");
    const form = h("form", { class: "card sign-in", testid: "sign-in-form" },
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" }, "Use the reviewer token an administrator made for you with ",
        h("code", {}, "airlock token add"), "."),
      h("label", { for: "token" }, "Reviewer token"),
      input, status,
      h("div", { class: "actions" }, submit));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (token === "") {
        status.replaceChildren(errorBox("Enter your token."));
        return;
      }
      submit.disabled = true;
      status.replaceChildren(h("span", { class: "muted" }, "Signing in…"));
      try {
        session = await api("POST", "/v1/session", { token });
        input.value = "";
        startSignedIn();
      } catch (e) {
        const message = e instanceof ApiError && e.status === 401
          ? "That token is not valid (or has been revoked)." : e.message;
        status.replaceChildren(errorBox(message, "sign-in-error"));
        submit.disabled = false;
        input.focus();
      }
    });
    main.replaceChildren(form);
    input.focus();
  }

  async function signOut() {
    try {
      await api("DELETE", "/v1/session");
    } catch (e) {
      // Signed out locally either way; the cookie may already be gone.
      if (!(e instanceof ApiError) || e.status !== 401) console.warn("sign-out:", e.message);
    }
    signedOut("Signed out.");
  }

  function startSignedIn() {
    showSession();
    startLive();
    render();
  }

  // ---------------------------------------------------------------------------
  // Live updates: server-sent events, polling when they fail.

  function setLive(kind, text) {
    const el = document.querySelector('[data-testid="live-status"]');
    el.className = "live live-" + kind;
    el.dataset.mode = kind;
    el.textContent = text;
  }

  function startLive() {
    stopLive();
    if (typeof EventSource !== "function") {
      startPolling();
      return;
    }
    setLive("connecting", "connecting…");
    const es = new EventSource("/v1/events");
    events = es;
    es.addEventListener("open", () => {
      if (events !== es) return;
      setLive("ok", "live");
      if (pollTimer !== null) {
        stopPolling();
        scheduleRefresh(); // catch up on anything missed while disconnected
      }
    });
    es.addEventListener("change", () => {
      if (events === es) scheduleRefresh();
    });
    es.addEventListener("error", () => {
      if (events !== es) return;
      if (es.readyState === EventSource.CLOSED) events = null;
      startPolling();
    });
  }

  function startPolling() {
    if (pollTimer !== null) return;
    setLive("poll", "polling every 3 s");
    pollTimer = setInterval(() => {
      if (session) refresh();
    }, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  function stopLive() {
    if (events) events.close();
    events = null;
    stopPolling();
    clearTimeout(refreshTimer);
    refreshTimer = null;
  }

  /** Coalesces changes: one refresh at most every DEBOUNCE_MS. (A timer reset by
   * every event would never fire while the queue is busy.) */
  function scheduleRefresh() {
    if (refreshTimer !== null) return;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      refresh();
    }, DEBOUNCE_MS);
  }

  // ---------------------------------------------------------------------------
  // Routing

  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const parts = hash.split("/").slice(1);
    const arg = () => {
      try {
        return decodeURIComponent(parts.slice(1).join("/"));
      } catch {
        return null;
      }
    };
    if (parts[0] === "" || parts.length === 0) return { view: "pending", key: "pending" };
    if (parts[0] === "runs" && parts.length === 1) return { view: "runs", key: "runs" };
    if (parts[0] === "intent" && parts.length > 1 && arg()) return { view: "intent", id: arg(), key: "intent:" + arg() };
    if (parts[0] === "run" && parts.length > 1 && arg()) return { view: "run", run: arg(), key: "run:" + arg() };
    return { view: "unknown", key: "unknown:" + hash };
  }

  const VIEWS = { pending: viewPending, intent: viewIntent, runs: viewRuns, run: viewRun, unknown: viewUnknown };

  /** Renders the current route: a new view, or fresh data for the same one. */
  async function render() {
    if (!session) return;
    const r = route();
    const fresh = shownRoute !== r.key;
    if (fresh) {
      kept = new Map();
      flash = flash && flash.route === r.key ? flash : null;
      main.replaceChildren(h("p", { class: "muted", testid: "loading" }, "Loading…"));
    }
    shownRoute = r.key;
    for (const a of document.querySelectorAll("[data-nav]")) {
      a.classList.toggle("current", a.dataset.nav === r.view || (a.dataset.nav === "runs" && r.view === "run"));
    }
    const seq = ++renderSeq;
    let nodes;
    try {
      nodes = await VIEWS[r.view](r);
    } catch (e) {
      const box = failed(e);
      if (box === null) return;
      nodes = [box];
    }
    if (seq !== renderSeq || !session) return; // a newer render, or signed out meanwhile
    if (flash && flash.route === r.key) {
      nodes.unshift(keep("flash:" + flash.id, () =>
        h("div", { class: "notice notice-" + flash.kind, role: "status", testid: "flash" }, flash.text)));
    }
    patchChildren(main, nodes);
    if (fresh) {
      const title = main.querySelector("h1");
      document.title = (title ? title.textContent + " · " : "") + "Airlock review";
    }
  }

  const refresh = render;

  function setFlash(kind, text) {
    flash = { route: shownRoute, kind, text, id: Date.now() + ":" + Math.random() };
  }

  // ---------------------------------------------------------------------------
  // Views

  async function viewPending() {
    const data = await api("GET", "/v1/intents?state=awaiting_review&limit=500");
    const items = (data && data.items) || [];
    const heading = h("div", { class: "view-head" },
      h("h1", {}, "Pending review"),
      h("p", { class: "muted", testid: "pending-count" },
        items.length === 0 ? "Nothing is waiting for a decision."
          : items.length + (items.length === 1 ? " intent is" : " intents are") + " waiting for a decision."));
    if (items.length === 0) {
      return [heading, h("div", { class: "empty card", testid: "pending-empty" }, "All clear. New intents that need review appear here by themselves.")];
    }
    const rows = items.map((it) => h("tr", { testid: "intent-row", data: { id: String(it.id) } },
      h("td", { "data-label": "Intent" },
        h("a", { href: intentHref(it.id), class: "id", testid: "intent-link" }, String(it.id)),
        h("div", { class: "sub" }, "target ", String(it.target), " · ", (it.tables || []).join(", "),
          " · ", String(it.ops), it.ops === 1 ? " op" : " ops")),
      h("td", { "data-label": "Run" }, h("a", { href: runHref(it.run) }, String(it.run))),
      h("td", { "data-label": "Reason", class: "reason-cell" },
        h("span", { class: "reason", testid: "intent-reason" }, String(it.reason ?? ""))),
      h("td", { "data-label": "Agent" }, it.agent == null ? h("span", { class: "muted" }, "—") : String(it.agent)),
      h("td", { "data-label": "Policy" }, reasonsList(it.decision && it.decision.reasons, "policy-reasons")),
      h("td", { "data-label": "Review" }, progress(it.review)),
      h("td", { "data-label": "Deadline" }, it.review ? rel(it.review.deadline, { kind: "deadline" }) : "—"),
      h("td", { "data-label": "Age" }, rel(it.received_at))));
    const table = h("table", { class: "table stack", testid: "pending-table" },
      h("thead", {}, h("tr", {}, ["Intent", "Run", "Reason", "Agent", "Policy reasons", "Review", "Deadline", "Age"]
        .map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows));
    const more = data && data.next
      ? h("p", { class: "muted" }, "Showing the 500 newest; more are waiting. Decide these first, or use the API with ",
        h("code", {}, "before"), ".")
      : null;
    return [heading, h("div", { class: "scroll" }, table), more].filter(Boolean);
  }

  async function viewIntent(r) {
    let it;
    try {
      it = await api("GET", "/v1/intents/" + encodeURIComponent(r.id));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        return [h("h1", {}, "Intent not found"), errorBox("No intent has the id " + r.id + ".", "not-found")];
      }
      throw e;
    }
    const nodes = [];
    nodes.push(h("div", { class: "view-head" },
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Pending"), " / ", h("a", { href: runHref(it.run) }, "run " + it.run)),
      h("h1", { class: "id", testid: "intent-id" }, String(it.id), " ", stateBadge(it.state))));

    nodes.push(h("section", { class: "card" },
      h("h2", {}, "Reason"),
      h("p", { class: "reason-full", testid: "intent-reason" }, String(it.reason ?? "")),
      h("dl", { class: "facts" },
        fact("Run", h("a", { href: runHref(it.run) }, String(it.run))),
        fact("Target", String(it.target)),
        fact("Tables", (it.tables || []).join(", ") || "—"),
        fact("Ops", String(it.ops)),
        fact("Received", time(it.received_at), " (", rel(it.received_at), ")"),
        fact("Updated", time(it.updated_at)),
        fact("File", it.file == null ? "—" : String(it.file)),
        fact("Digest", h("code", { class: "digest", testid: "digest" }, String(it.digest))))));

    if (it.error) {
      nodes.push(h("section", { class: "notice notice-bad", testid: "intent-error" },
        h("strong", {}, "Problem: "), errorText(it.error)));
    }


    const decision = it.decision;
    nodes.push(h("section", { class: "card", testid: "decision" },
      h("h2", {}, "Policy decision"),
      decision
        ? [h("p", {}, verdictBadge(decision.verdict),
          decision.verdict === "review" && it.review ? [" · ", progress(it.review)] : null,
          it.state === "awaiting_review" && it.review && it.review.deadline
            ? [" · deadline ", time(it.review.deadline), " (", rel(it.review.deadline, { kind: "deadline" }), ")"]
            : null),
        reasonsList(decision.reasons, "decision-reasons"),
        h("p", { class: "sub" }, "Policy ", h("code", { class: "digest" }, String(decision.policy ?? "—")),
          decision.decision_id ? [" · decision id ", h("code", {}, String(decision.decision_id))] : null)]
        : h("p", { class: "muted" }, "Not decided yet.")));

    nodes.push(changesSection(it));
    nodes.push(decisionPanel(it));
    nodes.push(votesSection(it));
    nodes.push(provenanceSection(it.provenance));
    nodes.push(h("section", { class: "card" },
      h("h2", {}, "Payload"),
      h("p", { class: "muted" }, "The intent exactly as the agent wrote it (parsed)."),
      details("payload:" + it.id, "The JSON", "payload-fold", true,
        h("pre", { class: "json", testid: "payload" }, JSON.stringify(it.payload, null, 2)))));
    nodes.push(historySection(it.history, "History", "intent-history"));
    return nodes;
  }

  function fact(label, ...value) {
    return [h("dt", {}, label), h("dd", {}, value)];
  }

  function errorText(err) {
    if (typeof err === "string") return err;
    if (err && typeof err.message === "string") {
      const where = [err.stage, Number.isInteger(err.op) ? "op " + (err.op + 1) : null, err.code]
        .filter((x) => typeof x === "string" && x !== "").join(", ");
      return where ? err.message + " (" + where + ")" : err.message;
    }
    return json(err);
  }

  /** Approve / reject, for approvers of an intent awaiting review. Kept across
   * refreshes so a comment being typed survives live updates. */
  function decisionPanel(it) {
    if (it.state !== "awaiting_review") return null;
    if (!canDecide()) {
      return h("section", { class: "notice notice-info", testid: "viewer-note" },
        "You are signed in as a viewer: you can read this intent but not approve or reject it.");
    }
    return keep("decide:" + it.id + ":" + it.digest, () => {
      const comment = h("textarea", {
        id: "review-comment", rows: "3", testid: "review-comment",
        placeholder: "Why you approve or reject. A rejection needs one: the agent sees it.",
      });
      const status = h("div", { class: "form-status", role: "status", testid: "review-status" });
      const approve = h("button", { type: "button", class: "btn btn-ok", testid: "approve" }, "Approve");
      const reject = h("button", { type: "button", class: "btn btn-bad", testid: "reject" }, "Reject");
      const decide = async (verdict) => {
        const text = comment.value.trim();
        if (verdict === "reject" && text === "") {
          status.replaceChildren(errorBox("A rejection needs a comment: it is the reason the agent sees.", "review-error"));
          comment.focus();
          return;
        }
        approve.disabled = true;
        reject.disabled = true;
        status.replaceChildren(h("span", { class: "muted" }, verdict === "approve" ? "Approving…" : "Rejecting…"));
        const body = { digest: it.digest };
        if (verdict === "approve") {
          const seen = shownPreview.get(it.id);
          if (typeof seen !== "string") {
            status.replaceChildren(errorBox("The rows this intent touches could not be previewed, so it cannot be approved yet. Wait for the preview under Changes.", "review-error"));
            approve.disabled = false;
            reject.disabled = false;
            return;
          }
          body.preview_digest = seen;
        }
        if (text !== "" || verdict === "reject") body.comment = text;
        try {
          const res = await api("POST", "/v1/intents/" + encodeURIComponent(it.id) + "/" + verdict, body);
          if (verdict === "approve") {
            const more = res && res.needed > res.approvals
              ? " It needs " + (res.needed - res.approvals) + " more approval(s) from other reviewers." : "";
            setFlash("ok", "You approved " + it.id + " (" + res.approvals + " of " + res.needed + "). State: "
              + String(res.state).replace(/_/g, " ") + "." + more);
          } else {
            setFlash("bad", "You rejected " + it.id + ". State: " + String(res && res.state).replace(/_/g, " ") + ".");
          }
          comment.value = "";
          status.replaceChildren();
          kept.delete("decide:" + it.id + ":" + it.digest);
          refresh();
        } catch (e) {
          if (e instanceof ApiError && e.status === 401) {
            signedOut("Your session has ended; sign in again.");
            return;
          }
          const conflict = e instanceof ApiError && e.status === 409;
          status.replaceChildren(errorBox(e.message, "review-error"),
            conflict ? h("p", { class: "muted" }, "The page now shows the intent as it is.") : null);
          approve.disabled = false;
          reject.disabled = false;
          if (conflict) refresh();
        }
      };
      approve.addEventListener("click", () => decide("approve"));
      reject.addEventListener("click", () => decide("reject"));
      const mine = (Array.isArray(it.votes) ? it.votes : []).find((v) => v.reviewer === session.name && v.digest === it.digest);
      return h("section", { class: "card decide", testid: "decide-panel" },
        h("h2", {}, "Your decision"),
        mine ? h("div", { class: "notice notice-info", testid: "own-vote" }, mine.verdict === "approve"
          ? "You approved this already; it needs approvals from other reviewers. You can still reject it."
          : "You rejected this already.") : null,
        h("p", { class: "muted" }, "Your decision is bound to digest ", h("code", { class: "digest" }, String(it.digest)),
          ": if the intent changed, it is refused. An approval also binds the rows shown under Changes: if they change before the intent is applied, it comes back for review."),
        h("label", { for: "review-comment" }, "Comment"),
        comment, status,
        h("div", { class: "actions" }, approve, reject));
    });
  }

  function votesSection(it) {
    const votes = Array.isArray(it.votes) ? it.votes : [];
    return h("section", { class: "card", testid: "votes" },
      h("h2", {}, "Votes"),
      votes.length === 0
        ? h("p", { class: "muted" }, "No reviewer has voted yet.")
        : h("div", { class: "scroll" }, h("table", { class: "table" },
          h("thead", {}, h("tr", {}, ["Reviewer", "Verdict", "Comment", "At"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, votes.map((v) => h("tr", { testid: "vote", data: { reviewer: String(v.reviewer) } },
            h("td", {}, String(v.reviewer)),
            h("td", {}, verdictBadge(v.verdict),
              v.digest && v.digest !== it.digest ? h("div", { class: "sub" }, "for an earlier digest") : null),
            h("td", { class: "reason" }, v.comment == null || v.comment === "" ? h("span", { class: "muted" }, "—") : String(v.comment)),
            h("td", {}, time(v.at))))))));
  }

  // --- the before/after diff -------------------------------------------------

  function changesSection(it) {
    const section = h("section", { class: "card", testid: "changes" });
    let source = null;
    let note;
    const applied = it.applied != null || it.state === "applied" || it.state === "undone";
    if (applied) {
      source = it.applied;
      note = "What this intent did when it was applied" + (it.applied && it.applied.applied_at ? " (" + new Date(it.applied.applied_at).toLocaleString() + ")" : "")
        + ", from the undo images its ledger row holds.";
    } else {
      source = it.preview;
      shownPreview.set(it.id, source && typeof source.digest === "string" ? source.digest : null);
      note = "What this intent would do to the target now: a rehearsal in a transaction that was rolled back. Every check runs again when it is applied.";
    }
    if (source == null) {
      append(section, [h("h2", {}, "Changes"), h("p", { class: "muted", testid: "no-changes" },
        applied ? "No undo images were recorded for this intent."
          : "This intent ended " + String(it.state).replace(/_/g, " ") + ": it wrote nothing, so there is nothing to show.")]);
      return section;
    }
    append(section, [h("h2", {}, "Changes"), h("p", { class: "muted" }, note)]);
    if (source.error != null) {
      section.append(errorBox((applied ? "The target could not say: " : "It would fail: ") + errorText(source.error), "preview-error"));
      return section;
    }
    if (source.already) {
      section.append(h("div", { class: "notice notice-info", testid: "already" },
        "The target's ledger already holds this intent: it was applied there, and applying it again changes nothing."));
    }
    section.append(legend());
    const payloadOps = (it.payload && Array.isArray(it.payload.ops)) ? it.payload.ops : [];
    for (const op of source.ops || []) {
      const spec = payloadOps[op.index] || {};
      const kind = typeof op.op === "string" ? op.op : typeof spec.op === "string" ? spec.op : "op";
      const table = typeof op.table === "string" ? op.table : typeof spec.table === "string" ? spec.table : "";
      const before = Array.isArray(op.before) ? op.before : [];
      const after = Array.isArray(op.after) ? op.after : [];
      const block = h("div", { class: "op", testid: "diff-op", data: { index: String(op.index), kind } },
        h("h3", {}, "Op " + (Number(op.index) + 1) + ": ", h("span", { class: "op-kind op-" + kind }, kind),
          " ", table,
          h("span", { class: "muted" }, " — " + op.rows + (op.rows === 1 ? " row" : " rows"))));
      const n = Math.max(before.length, after.length);
      if (n === 0) block.append(h("p", { class: "muted", testid: "diff-empty" }, "Touches no rows."));
      for (let i = 0; i < n; i++) block.append(rowDiff(before[i] ?? null, after[i] ?? null));
      section.append(block);
    }
    return section;
  }

  function legend() {
    return h("p", { class: "legend", testid: "diff-legend" },
      h("span", { class: "key cell-changed" }, "changed"), " value differs before and after · ",
      h("span", { class: "key cell-added" }, "added"), " row did not exist before · ",
      h("span", { class: "key cell-removed" }, "removed"), " row is deleted");
  }

  /** One row before and after, columns down the side so wide rows stay readable. */
  function rowDiff(before, after) {
    const columns = [];
    for (const row of [before, after]) {
      if (row && typeof row === "object") for (const c of Object.keys(row)) if (!columns.includes(c)) columns.push(c);
    }
    const eq = (a, b) => json(a) === json(b);
    const body = columns.map((c) => {
      const b = before ? before[c] : undefined;
      const a = after ? after[c] : undefined;
      let cls = "";
      if (!before) cls = "cell-added";
      else if (!after) cls = "cell-removed";
      else if (!eq(b, a)) cls = "cell-changed";
      return h("tr", { class: cls, testid: "diff-row", data: { column: c, change: cls.replace("cell-", "") || "same" } },
        h("th", { scope: "row" }, c),
        h("td", { testid: "diff-before" }, before ? value(b) : h("span", { class: "muted" }, "(no row)")),
        h("td", { testid: "diff-after" }, after ? value(a) : h("span", { class: "gone" }, "deleted")));
    });
    const status = !before ? "inserted row" : !after ? "deleted row" : "updated row";
    return h("table", { class: "table diff", testid: "diff-table", data: { status: status.split(" ")[0] } },
      h("caption", {}, status),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Column"), h("th", { scope: "col" }, "Before"), h("th", { scope: "col" }, "After"))),
      h("tbody", {}, body));
  }

  function provenanceSection(prov) {
    const section = h("section", { class: "card", testid: "provenance" }, h("h2", {}, "Provenance"));
    if (!prov || typeof prov !== "object") {
      section.append(h("p", { class: "muted" }, "The agent gave none."));
      return section;
    }
    section.append(h("table", { class: "table kv" }, h("tbody", {},
      Object.entries(prov).map(([k, v]) => h("tr", { data: { key: k } },
        h("th", { scope: "row" }, k), h("td", { class: "mono-wrap" }, value(v)))))));
    return section;
  }

  function historySection(history, title, testid, withIntent = false, note = null) {
    const records = Array.isArray(history) ? history : [];
    return h("section", { class: "card", testid },
      h("h2", {}, title, h("span", { class: "muted" }, " (" + records.length + " records)")),
      note,
      records.length === 0 ? h("p", { class: "muted" }, "No records.")
        : h("ol", { class: "history" }, records.map((rec) => h("li", { testid: "history-record", data: { event: String(rec.event) } },
          h("span", { class: "seq" }, "#" + rec.seq), " ",
          h("span", { class: "event event-" + String(rec.event) }, String(rec.event)), " ",
          withIntent && rec.intent ? [h("a", { href: intentHref(rec.intent) }, String(rec.intent)), " "] : null,
          time(rec.at),
          recordData(rec.data)))));
  }

  /** A record's data: who and why first, the rest as compact JSON. */
  function recordData(data) {
    if (data == null || typeof data !== "object") return null;
    const parts = [];
    if (typeof data.by === "string") parts.push(h("span", { class: "by" }, "by ", h("strong", {}, data.by)));
    for (const k of ["comment", "reason"]) {
      if (typeof data[k] === "string" && data[k] !== "") parts.push(h("span", { class: "quote" }, "“", data[k], "”"));
    }
    const rest = Object.fromEntries(Object.entries(data).filter(([k]) => !["by", "comment", "reason"].includes(k)));
    return h("div", { class: "record-data" }, parts,
      Object.keys(rest).length ? h("code", { class: "mono-wrap" }, json(rest)) : null);
  }

  async function viewRuns() {
    const data = await api("GET", "/v1/runs");
    const items = (data && data.items) || [];
    const heading = h("div", { class: "view-head" }, h("h1", {}, "Runs"),
      h("p", { class: "muted" }, items.length + (items.length === 1 ? " run" : " runs") + " in the log."));
    if (items.length === 0) return [heading, h("div", { class: "empty card" }, "No runs yet.")];
    return [heading, h("div", { class: "scroll" }, h("table", { class: "table stack", testid: "runs-table" },
      h("thead", {}, h("tr", {}, ["Run", "Intents by state", "Records", "Head"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, items.map((run) => h("tr", { testid: "run-row", data: { run: String(run.run) } },
        h("td", { "data-label": "Run" }, h("a", { href: runHref(run.run), testid: "run-link" }, String(run.run))),
        h("td", { "data-label": "Intents" }, countsBadges(run.counts)),
        h("td", { "data-label": "Records" }, String(run.records ?? "—")),
        h("td", { "data-label": "Head" }, h("code", { class: "digest" }, headText(run.head))))))))];
  }

  function headText(head) {
    if (head == null) return "—";
    return typeof head === "string" ? head : json(head);
  }

  async function viewRun(r) {
    let run;
    try {
      run = await api("GET", "/v1/runs/" + encodeURIComponent(r.run));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        return [h("h1", {}, "Run not found"), errorBox("No run is named " + r.run + ".", "not-found")];
      }
      throw e;
    }
    const intents = Array.isArray(run.intents) ? run.intents : [];
    const omitted = run.omitted || {};
    const omittedNote = (n, what) => n > 0
      ? h("p", { class: "notice notice-info", testid: "omitted" }, n + " older " + what + " not shown here; ",
        h("code", {}, "airlock export --run " + run.run), " has them all.")
      : null;
    return [
      h("div", { class: "view-head" },
        h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs")),
        h("h1", { class: "id", testid: "run-name" }, "Run ", String(run.run)),
        h("p", {}, countsBadges(run.counts), " · ", String(run.records ?? 0), " records"),
        h("p", { class: "muted" }, "Head: ", h("code", { class: "digest" }, headText(run.head)))),
      canUndo() ? undoPanel(run.run) : null,
      h("section", { class: "card", testid: "run-intents" },
        h("h2", {}, "Intents", h("span", { class: "muted" }, " (queue order)")),
        omittedNote(omitted.intents, omitted.intents === 1 ? "intent is" : "intents are"),
        intents.length === 0 ? h("p", { class: "muted" }, "None.")
          : h("div", { class: "scroll" }, h("table", { class: "table stack" },
            h("thead", {}, h("tr", {}, ["Intent", "State", "Reason", "Ops", "Received"].map((c) => h("th", { scope: "col" }, c)))),
            h("tbody", {}, intents.map((it) => h("tr", { testid: "run-intent-row", data: { id: String(it.id), state: String(it.state) } },
              h("td", { "data-label": "Intent" }, h("a", { href: intentHref(it.id), class: "id" }, String(it.id))),
              h("td", { "data-label": "State" }, stateBadge(it.state)),
              h("td", { "data-label": "Reason", class: "reason-cell" }, h("span", { class: "reason" }, String(it.reason ?? ""))),
              h("td", { "data-label": "Ops" }, String(it.ops), " · ", (it.tables || []).join(", ")),
              h("td", { "data-label": "Received" }, time(it.received_at)))))))),
      historySection(run.history, "History", "run-history", true, omittedNote(omitted.history, omitted.history === 1 ? "record is" : "records are")),
    ].filter(Boolean);
  }

  /** Undo for admins: a button, a confirm step with "force", then the outcome. */
  function undoPanel(runName) {
    return keep("undo:" + runName, () => {
      const panel = h("section", { class: "card undo", testid: "undo-panel" });
      const outcome = h("div", { class: "undo-outcome", testid: "undo-outcome", role: "status" });
      const force = h("input", { type: "checkbox", id: "undo-force", testid: "undo-force" });
      const start = h("button", { type: "button", class: "btn btn-bad", testid: "undo" }, "Undo this run…");
      const confirm = h("button", { type: "button", class: "btn btn-bad", testid: "undo-confirm" }, "Yes, undo the run");
      const cancel = h("button", { type: "button", class: "btn btn-quiet", testid: "undo-cancel" }, "Cancel");
      const confirmBox = h("div", { class: "confirm", testid: "undo-confirm-box", hidden: true },
        h("p", {}, "This reverts every applied intent of run ", h("strong", {}, runName),
          " in the target database, newest first, from the undo images Airlock recorded. If a row changed since, nothing is reverted and the conflicts are listed."),
        h("p", {}, force, " ", h("label", { for: "undo-force" },
          "Force: revert even rows that changed since (recorded as forced, with the conflicts)")),
        h("div", { class: "actions" }, confirm, cancel));
      start.addEventListener("click", () => {
        confirmBox.hidden = false;
        start.hidden = true;
        cancel.focus();
      });
      cancel.addEventListener("click", () => {
        confirmBox.hidden = true;
        start.hidden = false;
        force.checked = false;
      });
      confirm.addEventListener("click", async () => {
        confirm.disabled = true;
        cancel.disabled = true;
        outcome.replaceChildren(h("span", { class: "muted" }, "Undoing…"));
        const body = force.checked ? { force: true } : {};
        try {
          const res = await api("POST", "/v1/runs/" + encodeURIComponent(runName) + "/undo", body);
          outcome.replaceChildren(undoOutcome(res));
          refresh();
        } catch (e) {
          if (e instanceof ApiError && e.status === 401) {
            signedOut("Your session has ended; sign in again.");
            return;
          }
          outcome.replaceChildren(errorBox(e.message, "undo-error"));
        }
        confirm.disabled = false;
        cancel.disabled = false;
        confirmBox.hidden = true;
        start.hidden = false;
        force.checked = false;
      });
      append(panel, [h("h2", {}, "Undo"),
        h("p", { class: "muted" }, "Admins can roll this run back in the target database."),
        start, confirmBox, outcome]);
      return panel;
    });
  }

  function undoOutcome(res) {
    const kinds = { undone: "ok", nothing: "info", refused: "bad", conflicts: "bad" };
    const texts = {
      undone: "Undone.",
      nothing: "Nothing to undo: every intent of the run was undone already.",
      refused: "Refused: later intents of the run wrote the same rows.",
      conflicts: "Not undone: rows changed since they were applied. Nothing was reverted in that target.",
    };
    const outcome = String(res && res.outcome);
    const list = (title, ids, testid) => Array.isArray(ids) && ids.length
      ? h("div", { testid }, h("h3", {}, title), h("ul", {}, ids.map((x) => h("li", {}, typeof x === "string" ? x : json(x)))))
      : null;
    return h("div", { class: "notice notice-" + (kinds[outcome] || "info"), testid: "undo-result", data: { outcome } },
      h("p", {}, h("strong", {}, outcome), " — ", texts[outcome] || ""),
      list("Reverted", res.reverted, "undo-reverted"),
      list("Recorded only (the target had reverted them already)", res.recorded_only, "undo-recorded-only"),
      objectsTable("Forced over conflicts", res.forced, "undo-forced"),
      objectsTable("Conflicts", res.conflicts, "undo-conflicts"),
      objectsTable("Later writes in the way", res.later, "undo-later"));
  }

  /** Conflicts and later writes (objects) as a table with a column per key. */
  function objectsTable(title, items, testid) {
    if (!Array.isArray(items) || items.length === 0) return null;
    const labels = { intent_id: "Intent", op: "Op", table: "Table", key: "Key", expected: "Expected", found: "Found" };
    const cols = Object.keys(labels).filter((k) => items.some((it) => it && typeof it === "object" && k in it));
    if (cols.length === 0) return h("div", { testid }, h("h3", {}, title), h("ul", {}, items.map((x) => h("li", {}, json(x)))));
    const cell = (it, c) => {
      const v = it == null ? undefined : it[c];
      if (v === undefined) return h("td", {}, "");
      if (c === "op" && Number.isInteger(v)) return h("td", {}, String(v + 1));
      if (c === "intent_id" && typeof v === "string") return h("td", {}, h("a", { href: intentHref(v), class: "id" }, v));
      if (typeof v === "string") return h("td", {}, v);
      return h("td", { class: "mono-wrap" }, v === null ? h("span", { class: "null" }, "no row") : json(v));
    };
    return h("div", { testid }, h("h3", {}, title), h("div", { class: "scroll" }, h("table", { class: "table" },
      h("thead", {}, h("tr", {}, cols.map((c) => h("th", { scope: "col" }, labels[c])))),
      h("tbody", {}, items.map((it) => h("tr", {}, cols.map((c) => cell(it, c))))))));
  }

  async function viewUnknown() {
    return [h("h1", {}, "Not found"), h("p", {}, "This page has no such view. ", h("a", { href: "#/" }, "Go to pending intents."))];
  }

  // ---------------------------------------------------------------------------
  // Start

  async function boot() {
    document.querySelector('[data-testid="sign-out"]').addEventListener("click", signOut);
    window.addEventListener("hashchange", () => {
      if (session) render();
    });
    setInterval(tickRelative, 15000);
    try {
      session = await api("GET", "/v1/session");
      startSignedIn();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        signedOut(null);
      } else {
        main.replaceChildren(errorBox("Could not ask who you are: " + e.message, "boot-error"),
          h("p", {}, h("a", { href: location.pathname + location.hash }, "Try again")));
      }
    }
  }

  boot();
})();

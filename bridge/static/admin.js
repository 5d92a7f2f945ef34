// The operator page (GET /admin): the rollout, its gates, the breakers, the flags, the history
// and the audit trail of the bridge that served it, from the operators' JSON API under /admin/
// (CONTRACT.md section 4; bridge/admin.py), refreshed every second. Plain JS, no build step.
//
// The admin token is pasted (or given once as /admin#token=..., then removed from the URL) and
// kept in sessionStorage only; every request sends it as `Authorization: Bearer`. Everything the
// server says is written with textContent (actor and reason are operator input), never as HTML.
// An API error is shown as "<status> <code>: <message>": #conn for the refresh (401/403 stop it
// until another token is given), #notice for the last action.
//
// For tests and styling the values also sit in stable ids and data attributes: #state[data-state],
// #stage[data-stage], #percent[data-percent], #stages li[data-stage-state=past|current|next],
// #gates tr[data-gate][data-verdict] (td.value[data-value], td.samples, td.verdict),
// #breakers li[data-replica][data-state], #flag-*[data-value], #history / #audit
// tr[data-action][data-actor][data-gate][data-forced], #notice / #conn [data-state=ok|error|...]
// [data-status][data-code].
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STORAGE_KEY = "chat-bridge.admin-token";
  const REFRESH_MS = 1000;
  const AUDIT_LIMIT = 50;
  const els = {
    tokenForm: $("token-form"), token: $("token"), forget: $("forget-token"), conn: $("conn"),
    state: $("state"), auto: $("auto"), stages: $("stages"), stage: $("stage"), percent: $("percent"),
    plan: $("plan"), since: $("since"), window: $("window"), evaluated: $("evaluated"),
    gates: $("gates"), gatesEmpty: $("gates-empty"), breakers: $("breakers"), breakersEmpty: $("breakers-empty"),
    history: $("history"), audit: $("audit"), notice: $("notice"), reason: $("reason"),
    startForm: $("start-form"), planInput: $("plan-input"), dwellInput: $("dwell-input"),
    samplesInput: $("samples-input"), autoInput: $("auto-input"),
    start: $("start"), promote: $("promote"), forcePromote: $("force-promote"), pause: $("pause"),
    resume: $("resume"), rollback: $("rollback"), kill: $("kill"), enable: $("enable"),
  };

  let token = null;
  let generation = 0; // a new token restarts the refresh; answers for an older one are dropped
  let timer = null;
  let inflight = false;
  let again = false; // refresh once more as soon as the one in flight ends
  let stopped = false; // the current token was refused (401/403): no refresh until another one
  let busy = false; // an action is in flight
  let rollout = null; // the last GET /admin/rollout
  let flags = null; // the last GET /admin/flags
  const rendered = {}; // section -> the JSON it was last rendered from (unchanged: not redrawn)

  class ApiError extends Error {
    constructor(status, code, message, data) {
      super(message);
      this.status = status;
      this.code = code;
      this.data = data;
    }
  }

  function describe(err) {
    if (err instanceof ApiError) return `${err.status ? `${err.status} ` : ""}${err.code}: ${err.message}`;
    return `page error: ${err && err.message ? err.message : String(err)}`;
  }

  // The token's `sub`, for display only (the bridge verifies the token, the page does not).
  function tokenSub(jwt) {
    try {
      const payload = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)));
      const sub = JSON.parse(json).sub;
      return typeof sub === "string" ? sub : null;
    } catch {
      return null;
    }
  }

  async function api(method, path, body) {
    const init = { method, cache: "no-store", headers: { Authorization: `Bearer ${token}`, Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "NETWORK", `the bridge did not answer (${err && err.message})`, null);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const code = (data && typeof data.code === "string" && data.code) || `HTTP_${response.status}`;
      const message = (data && typeof data.message === "string" && data.message) || text.slice(0, 200) || response.statusText;
      throw new ApiError(response.status, code, message, data);
    }
    return data;
  }

  function setLine(el, state, text, err) {
    el.dataset.state = state;
    if (err instanceof ApiError) {
      el.dataset.status = String(err.status);
      el.dataset.code = err.code;
    } else {
      delete el.dataset.status;
      delete el.dataset.code;
    }
    el.textContent = text;
  }

  // ---- formatting -------------------------------------------------------------------------

  const num = (value, digits = 3) => (Number.isInteger(value) ? String(value) : String(Number(value.toFixed(digits))));
  const pct = (value) => `${num(value, 2)} %`;
  const clock = (epochMs) => new Date(epochMs).toLocaleTimeString();
  const ago = (epochS) => {
    const s = Math.max(0, Math.round(Date.now() / 1000 - epochS));
    return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  };

  // A gate's value and threshold in its unit (bridge/gates.py's table).
  const UNITS = {
    dwell: { value: (v) => `${num(v, 1)} s`, threshold: (t) => `≥ ${num(t, 1)} s` },
    p95_ttft: { value: (v) => `${num(v)} s`, threshold: (t) => `≤ ${num(t)} s` },
    p95_completion: { value: (v) => `${num(v)} s`, threshold: (t) => `≤ ${num(t)} s` },
    p95_ttft_vs_complete: { value: (v) => `${num(v)} ×`, threshold: (t) => `≤ ${num(t)} ×` },
    failed_sends: { value: (v) => pct(v * 100), threshold: (t) => `≤ ${pct(t * 100)}` },
  };
  const PLAIN = { value: (v) => num(v), threshold: (t) => `= ${num(t)}` };

  function summary(value) {
    if (value == null) return "–";
    if (typeof value !== "object") return String(value);
    if ("state" in value && "percent" in value) {
      const stage = typeof value.stage === "number" && value.stage >= 0 ? ` · stage ${value.stage + 1}` : "";
      return `${value.state}${stage} · ${pct(value.percent)}`;
    }
    return Object.entries(value)
      .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") || "[]" : v}`)
      .join(", ") || "{}";
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function changed(section, data) {
    const json = JSON.stringify(data);
    if (rendered[section] === json) return false;
    rendered[section] = json;
    return true;
  }

  // ---- rendering --------------------------------------------------------------------------

  function renderRollout(view) {
    rollout = view;
    els.since.textContent = view.stageSince == null ? "–" : `${clock(view.stageSince * 1000)} (${ago(view.stageSince)})`;
    els.since.dataset.epoch = view.stageSince == null ? "" : String(view.stageSince);
    els.evaluated.textContent = view.evaluatedAt == null ? "–" : `${clock(view.evaluatedAt * 1000)} (${ago(view.evaluatedAt)})`;
    els.evaluated.dataset.epoch = view.evaluatedAt == null ? "" : String(view.evaluatedAt);
    updateButtons();
    if (!changed("rollout", { ...view, evaluatedAt: null })) return;
    els.state.textContent = view.state.replace("_", " ");
    els.state.dataset.state = view.state;
    els.auto.textContent = view.auto ? "auto on" : "auto off";
    els.auto.dataset.auto = String(view.auto);
    els.stages.replaceChildren(
      ...view.plan.map((percent, index) => {
        const li = document.createElement("li");
        li.dataset.percent = String(percent);
        li.dataset.stageState = index < view.stage ? "past" : index === view.stage ? "current" : "next";
        li.dataset.rolloutState = view.state;
        li.textContent = pct(percent);
        return li;
      }),
    );
    els.stage.textContent = view.stage < 0 ? "–" : `${view.stage + 1} of ${view.plan.length}`;
    els.stage.dataset.stage = String(view.stage);
    els.percent.textContent = pct(view.percent);
    els.percent.dataset.percent = String(view.percent);
    els.plan.textContent = view.plan.length ? view.plan.map(pct).join(" → ") : "–";
    els.window.textContent = `dwell ${num(view.dwellS, 1)} s · at least ${view.minSamples} samples`;
    renderGates(view.gates);
    renderBreakers(view.breaker && view.breaker.replicas ? view.breaker.replicas : []);
    renderEntries(els.history, [...view.history].reverse(), false);
  }

  function renderGates(gates) {
    els.gatesEmpty.hidden = gates.length > 0;
    els.gates.replaceChildren(
      ...gates.map((gate) => {
        const unit = UNITS[gate.name] || PLAIN;
        const tr = document.createElement("tr");
        tr.dataset.gate = gate.name;
        tr.dataset.verdict = gate.verdict;
        const value = cell(gate.value == null ? "no data" : unit.value(gate.value), "value");
        value.dataset.value = gate.value == null ? "" : String(gate.value);
        const threshold = cell(unit.threshold(gate.threshold), "threshold");
        threshold.dataset.value = String(gate.threshold);
        const verdict = cell(gate.verdict, "verdict");
        verdict.dataset.verdict = gate.verdict;
        tr.append(cell(gate.name, "name"), value, threshold, cell(String(gate.samples), "samples"), verdict, cell(gate.detail || "", "detail"));
        return tr;
      }),
    );
  }

  function renderBreakers(replicas) {
    els.breakersEmpty.hidden = replicas.length > 0;
    els.breakers.replaceChildren(
      ...replicas.map((replica) => {
        const li = document.createElement("li");
        li.dataset.replica = replica.id;
        li.dataset.state = replica.state;
        li.textContent = `${replica.id}: ${replica.state.replace("_", " ")}`;
        return li;
      }),
    );
  }

  function renderFlags(view) {
    flags = view;
    updateButtons();
    if (!changed("flags", view)) return;
    const set = (id, text, value) => {
      const el = $(id);
      el.textContent = text;
      if (value !== undefined) el.dataset.value = String(value);
    };
    const list = (items) => (items && items.length ? items.join(", ") : "–");
    set("flag-enabled", view.enabled ? "yes (streaming on)" : "no (kill switch: everyone on the complete path)", view.enabled);
    set("flag-percent", pct(view.percent), view.percent);
    set("flag-allow-users", list(view.allowUsers));
    set("flag-allow-roles", list(view.allowRoles));
    set("flag-deny-users", list(view.denyUsers));
    set("flag-fallback", view.fallback ? "yes" : "no", view.fallback);
  }

  // History steps and audit entries: {at, actor, action, before, after, reason, forced?, gate?}.
  function renderEntries(tbody, entries, withForced) {
    tbody.replaceChildren(
      ...entries.map((entry) => {
        const tr = document.createElement("tr");
        tr.dataset.action = entry.action || "";
        tr.dataset.actor = entry.actor || "";
        tr.dataset.gate = entry.gate || "";
        tr.dataset.forced = String(Boolean(entry.forced));
        const at = entry.at ? new Date(entry.at) : null;
        const when = cell(at && !Number.isNaN(at.getTime()) ? at.toLocaleString() : entry.at || "–", "at");
        when.dataset.at = entry.at || "";
        tr.append(
          when,
          cell(entry.actor || "–", "actor"),
          cell(entry.action || "–", "action"),
          cell(`${summary(entry.before)} → ${summary(entry.after)}`, "change"),
          cell(entry.reason || "", "reason"),
        );
        if (withForced) tr.append(cell(entry.forced ? "forced" : "", "forced"));
        tr.append(cell(entry.gate || "", "gate"));
        return tr;
      }),
    );
  }

  function renderAudit(entries) {
    if (changed("audit", entries)) renderEntries(els.audit, entries, true);
  }

  function updateButtons() {
    const state = rollout && rollout.state;
    const known = Boolean(token && rollout);
    const enable = (button, on) => {
      button.disabled = busy || !on;
    };
    enable(els.start, known && !["running", "paused"].includes(state));
    enable(els.promote, known && state === "running");
    enable(els.forcePromote, known && state === "running");
    enable(els.pause, known && state === "running");
    enable(els.resume, known && state === "paused");
    enable(els.rollback, known && ["running", "paused"].includes(state));
    enable(els.kill, Boolean(token && flags && flags.enabled));
    enable(els.enable, Boolean(token && flags && !flags.enabled));
  }

  // ---- refresh ----------------------------------------------------------------------------

  async function refresh() {
    timer = null;
    if (!token || stopped) return;
    inflight = true;
    const gen = generation;
    try {
      const [view, flagView, audit] = await Promise.all([
        api("GET", "/admin/rollout"),
        api("GET", "/admin/flags"),
        api("GET", `/admin/audit?limit=${AUDIT_LIMIT}`),
      ]);
      if (gen === generation) {
        renderRollout(view);
        renderFlags(flagView);
        renderAudit(audit);
        const sub = tokenSub(token);
        setLine(els.conn, "ok", `${sub ? `Signed in as “${sub}”` : "Signed in"} · updated ${clock(Date.now())}`);
      }
    } catch (err) {
      if (gen === generation) {
        const refused = err instanceof ApiError && (err.status === 401 || err.status === 403);
        if (refused) stopped = true;
        setLine(els.conn, "error", `${describe(err)}${refused ? " — paste another token" : " (retrying)"}`, err);
      }
    } finally {
      inflight = false;
    }
    if (again || gen !== generation) {
      again = false;
      refresh();
      return;
    }
    if (token && !stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  function kick() {
    if (timer) clearTimeout(timer);
    timer = null;
    if (inflight) again = true;
    else refresh();
  }

  function useToken(value) {
    token = value;
    generation += 1;
    stopped = false;
    rollout = null;
    flags = null;
    for (const key of Object.keys(rendered)) delete rendered[key];
    try {
      sessionStorage.setItem(STORAGE_KEY, value);
    } catch {
      // storage disabled: the token lives in this page only
    }
    setLine(els.conn, "loading", "Loading…");
    setLine(els.notice, "idle", "");
    updateButtons();
    kick();
  }

  function forgetToken() {
    token = null;
    generation += 1;
    if (timer) clearTimeout(timer);
    timer = null;
    try {
      sessionStorage.removeItem(STORAGE_KEY);
    } catch {
      // nothing stored
    }
    els.token.value = "";
    setLine(els.conn, "idle", "No token.");
    updateButtons();
  }

  // ---- actions ----------------------------------------------------------------------------

  function reason() {
    const text = els.reason.value.trim();
    return text ? { reason: text } : {};
  }

  async function act(label, method, path, body, confirmText) {
    if (!token) {
      setLine(els.notice, "error", `${label}: paste an admin token first`);
      return;
    }
    if (confirmText && !window.confirm(confirmText)) return;
    busy = true;
    updateButtons();
    setLine(els.notice, "pending", `${label}…`);
    try {
      const data = await api(method, path, body);
      if (path === "/admin/flags") renderFlags(data);
      else renderRollout(data);
      els.reason.value = "";
      setLine(els.notice, "ok", `${label}: done at ${clock(Date.now())}`);
    } catch (err) {
      setLine(els.notice, "error", `${label}: ${describe(err)}`, err);
      // a refused promote lists the gates as judged for it
      if (err instanceof ApiError && err.data && Array.isArray(err.data.gates)) {
        renderGates(err.data.gates);
        delete rendered.rollout; // the next refresh redraws the view
      }
    } finally {
      busy = false;
      updateButtons();
      kick();
    }
  }

  function startBody() {
    const body = { auto: els.autoInput.checked, ...reason() };
    const plan = els.planInput.value.split(/[\s,;]+/).filter(Boolean).map(Number);
    if (plan.length) body.plan = plan; // not a number: JSON null, the API's 422 says which
    if (els.dwellInput.value !== "") body.dwellS = Number(els.dwellInput.value);
    if (els.samplesInput.value !== "") body.minSamples = Number(els.samplesInput.value);
    return body;
  }

  // ---- wiring -----------------------------------------------------------------------------

  els.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = els.token.value.trim();
    if (value) useToken(value);
  });
  els.forget.addEventListener("click", forgetToken);
  els.startForm.addEventListener("submit", (event) => {
    event.preventDefault();
    act("start", "POST", "/admin/rollout/start", startBody());
  });
  els.promote.addEventListener("click", () => act("promote", "POST", "/admin/rollout/promote", reason()));
  els.forcePromote.addEventListener("click", () =>
    act("force promote", "POST", "/admin/rollout/promote", { ...reason(), force: true },
      "Promote even though gates do not pass? It is audited as forced."),
  );
  els.pause.addEventListener("click", () => act("pause", "POST", "/admin/rollout/pause", reason()));
  els.resume.addEventListener("click", () => act("resume", "POST", "/admin/rollout/resume", reason()));
  els.rollback.addEventListener("click", () =>
    act("rollback", "POST", "/admin/rollout/rollback", reason(), "Roll back to the previous stage?"),
  );
  els.kill.addEventListener("click", () =>
    act("kill switch", "PATCH", "/admin/flags", { enabled: false, ...reason() },
      "Turn streaming off for everyone (every replica within a second)?"),
  );
  els.enable.addEventListener("click", () => act("re-enable", "PATCH", "/admin/flags", { enabled: true, ...reason() }));

  updateButtons();
  const hash = new URLSearchParams(window.location.hash.slice(1));
  let initial = hash.get("token");
  if (initial) {
    // out of the address bar (and its history) once read
    history.replaceState(null, "", window.location.pathname + window.location.search);
  } else {
    try {
      initial = sessionStorage.getItem(STORAGE_KEY);
    } catch {
      initial = null;
    }
  }
  if (initial) {
    els.token.value = initial;
    useToken(initial);
  } else {
    els.token.focus();
  }
})();

// Drives the operator page (GET /admin) in headless Chromium with playwright-core and prints one
// JSON line per result on stdout (tests/e2e/test_admin_page.py reads them as they come).
//
//   node admin_page.mjs <spec.json>
//
// Spec: {url, chromium, token, badToken, clientToken, start: {plan, dwellS, minSamples, reason},
// screenshots: {running, rolledBack, unauthorized}}. The flow:
//   1. a bad token pasted -> the 401 line; a client token as /admin#token=... -> the 403 line
//      (and the token gone from the address bar)
//   2. the admin token pasted -> the page signs in and shows the idle rollout
//   3. start with auto -> running; wait until the gates have values and samples ("gates")
//   4. promote -> the 409 message ("promote")
//   5. {kind: "signal", name: "fail"}: the test now makes the stream path fail; wait until the
//      page shows the rollback and the audit row naming the gate ("rolledBack")
//   6. the kill switch and re-enable ("killed", "enabled"); a reload signs in from
//      sessionStorage ("reloaded")
// Every record that shows the page carries a snapshot of what it displays (ids and data
// attributes, see bridge/static/admin.js). Exit 0 when every step ran, 3 on a failure.
import { readFileSync } from "node:fs";
import { launchChromium } from "./chromium.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = Date.now();

function out(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

async function waitFor(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  let last = null;
  while (Date.now() < deadline) {
    try {
      if (await predicate()) return;
    } catch (err) {
      last = err;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timeout waiting for ${what}${last ? ` (${last})` : ""}`);
}

async function open(browser, hash = "") {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1400 } });
  // CSP violations (an inline script or style would be one) are recorded, not just logged
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener("securitypolicyviolation", (event) => {
      window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
    });
  });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => {
    // an API answer of 4xx is logged by Chromium itself; the page shows it (what is tested)
    if (msg.type() === "error" && !msg.text().startsWith("Failed to load resource")) errors.push(msg.text());
  });
  // the confirm() of force promote, rollback and the kill switch: accepted, and recorded
  const dialogs = [];
  page.on("dialog", (dialog) => {
    dialogs.push({ type: dialog.type(), message: dialog.message() });
    dialog.accept();
  });
  const response = await page.goto(`${spec.url}/admin${hash}`);
  return { context, page, errors, dialogs, status: response.status() };
}

// Everything the page shows, read back from the DOM.
function snapshot(page) {
  return page.evaluate(() => {
    const $ = (id) => document.getElementById(id);
    const line = (el) => ({ state: el.dataset.state || null, status: el.dataset.status || null, code: el.dataset.code || null, text: el.textContent });
    const rows = (id) => [...$(id).querySelectorAll("tr")].map((tr) => ({
      action: tr.dataset.action, actor: tr.dataset.actor, gate: tr.dataset.gate || null,
      forced: tr.dataset.forced === "true", at: tr.querySelector(".at").dataset.at,
      change: tr.querySelector(".change").textContent, reason: tr.querySelector(".reason").textContent,
      actorText: tr.querySelector(".actor").textContent, gateText: tr.querySelector(".gate").textContent,
    }));
    return {
      conn: line($("conn")),
      notice: line($("notice")),
      state: $("state").dataset.state,
      stateText: $("state").textContent,
      auto: $("auto").dataset.auto,
      stage: Number($("stage").dataset.stage),
      percent: Number($("percent").dataset.percent),
      plan: $("plan").textContent,
      since: $("since").dataset.epoch ? Number($("since").dataset.epoch) : null,
      sinceText: $("since").textContent,
      stages: [...$("stages").children].map((li) => ({ percent: Number(li.dataset.percent), state: li.dataset.stageState, text: li.textContent })),
      gates: [...$("gates").querySelectorAll("tr")].map((tr) => {
        const verdict = tr.querySelector(".verdict");
        return {
          name: tr.dataset.gate,
          verdict: verdict.dataset.verdict,
          verdictText: verdict.textContent,
          value: tr.querySelector(".value").dataset.value === "" ? null : Number(tr.querySelector(".value").dataset.value),
          valueText: tr.querySelector(".value").textContent,
          threshold: Number(tr.querySelector(".threshold").dataset.value),
          thresholdText: tr.querySelector(".threshold").textContent,
          samples: Number(tr.querySelector(".samples").textContent),
          color: getComputedStyle(verdict).color,
          background: getComputedStyle(tr).backgroundColor,
        };
      }),
      breakers: [...$("breakers").children].map((li) => ({ id: li.dataset.replica, state: li.dataset.state })),
      flags: {
        enabled: $("flag-enabled").dataset.value, percent: $("flag-percent").dataset.value,
        allowRoles: $("flag-allow-roles").textContent, fallback: $("flag-fallback").dataset.value,
      },
      history: rows("history"),
      audit: rows("audit"),
      buttons: Object.fromEntries(["start", "promote", "force-promote", "pause", "resume", "rollback", "kill", "enable"].map((id) => [id, !$(id).disabled])),
      csp: window.__cspViolations,
      href: window.location.href,
      stored: sessionStorage.getItem("chat-bridge.admin-token") !== null,
    };
  });
}

async function paste(page, token) {
  await page.fill("#token", token);
  await page.click("#use-token");
}

const connState = (page) => page.locator("#conn").getAttribute("data-state");

async function refused(browser, label, how, token) {
  const other = await open(browser, how === "hash" ? `#token=${encodeURIComponent(token)}` : "");
  if (how === "paste") await paste(other.page, token);
  await waitFor(async () => (await connState(other.page)) === "error", 10000, `the ${label} error`);
  out({ kind: "refused", label, snapshot: await snapshot(other.page), errors: other.errors });
  if (label === "bad" && spec.screenshots.unauthorized) await other.page.screenshot({ path: spec.screenshots.unauthorized });
  await other.context.close();
}

async function click(page, id, label) {
  const notice = page.locator("#notice");
  await page.locator(`#${id}`).waitFor({ state: "visible" });
  await waitFor(() => page.isEnabled(`#${id}`), 5000, `#${id} enabled`);
  await page.click(`#${id}`);
  await waitFor(async () => ["ok", "error"].includes(await notice.getAttribute("data-state")), 10000, `the answer to ${label}`);
}

let shown = null; // the operator's page, for the failure record

async function main(browser) {
  // 1. refused tokens
  await refused(browser, "bad", "paste", spec.badToken);
  await refused(browser, "client", "hash", spec.clientToken);

  // 2. sign in
  const ops = await open(browser);
  out({ kind: "opened", status: ops.status });
  const { page } = ops;
  shown = page;
  await paste(page, spec.token);
  await waitFor(async () => (await connState(page)) === "ok", 10000, "signed in");
  await waitFor(async () => (await snapshot(page)).state !== "", 5000, "the rollout");
  out({ kind: "signedIn", snapshot: await snapshot(page) });

  // 3. start with auto
  await page.fill("#plan-input", spec.start.plan.join(", "));
  await page.fill("#dwell-input", String(spec.start.dwellS));
  await page.fill("#samples-input", String(spec.start.minSamples));
  await page.setChecked("#auto-input", true);
  await page.fill("#reason", spec.start.reason);
  await click(page, "start", "start");
  out({ kind: "started", snapshot: await snapshot(page) });
  let seen = null;
  await waitFor(async () => {
    seen = await snapshot(page);
    const ttft = seen.gates.find((g) => g.name === "p95_ttft");
    const dwell = seen.gates.find((g) => g.name === "dwell");
    return seen.state === "running" && ttft && ttft.value !== null && ttft.samples > 0 && dwell && dwell.verdict === "pass";
  }, 30000, "gates with values and samples");
  out({ kind: "gates", snapshot: seen });
  if (spec.screenshots.running) await page.screenshot({ path: spec.screenshots.running, fullPage: true });

  // 4. promote while gates wait
  await page.fill("#reason", "looks fine to me");
  await click(page, "promote", "promote");
  out({ kind: "promote", snapshot: await snapshot(page) });

  // 5. the stream path fails: rolled back by the controller, shown on the page
  out({ kind: "signal", name: "fail" });
  const failAt = Date.now();
  await waitFor(async () => {
    seen = await snapshot(page);
    return seen.state === "rolled_back" && seen.audit.some((row) => row.action === "rollback");
  }, 45000, "the rollback on the page");
  out({ kind: "rolledBack", afterMs: Date.now() - failAt, snapshot: seen });
  if (spec.screenshots.rolledBack) await page.screenshot({ path: spec.screenshots.rolledBack, fullPage: true });

  // 6. the kill switch and back; a reload keeps the token (sessionStorage)
  await page.fill("#reason", "drill: kill switch");
  await click(page, "kill", "the kill switch");
  await waitFor(async () => {
    const shown = await snapshot(page);
    return shown.flags.enabled === "false" && shown.audit[0].change.endsWith("enabled=false");
  }, 5000, "flags enabled=false and its audit entry");
  out({ kind: "killed", snapshot: await snapshot(page), dialogs: ops.dialogs });
  await click(page, "enable", "re-enable");
  await waitFor(async () => {
    const shown = await snapshot(page);
    return shown.flags.enabled === "true" && shown.audit[0].change.endsWith("enabled=true");
  }, 5000, "flags enabled=true and its audit entry");
  out({ kind: "enabled", snapshot: await snapshot(page) });
  await page.reload();
  await waitFor(async () => (await connState(page)) === "ok", 10000, "signed in after the reload");
  await waitFor(async () => (await snapshot(page)).state === "rolled_back", 5000, "the state after the reload");
  out({ kind: "reloaded", snapshot: await snapshot(page) });
  out({ kind: "pageErrors", errors: ops.errors });
}

const browser = await launchChromium(spec.chromium);
let code = 0;
try {
  await main(browser);
} catch (err) {
  let last = null;
  try {
    last = shown ? await snapshot(shown) : null;
  } catch {
    // the page is gone
  }
  out({ kind: "failed", detail: String(err && err.stack), snapshot: last });
  code = 3;
} finally {
  await browser.close();
}
out({ kind: "done", code });
process.exit(code);

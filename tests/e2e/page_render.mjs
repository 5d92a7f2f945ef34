// The try-it page's rendering of a burst of chunks and its client_timing report, in headless
// Chromium (playwright-core); prints one JSON line per result on stdout.
//
//   node page_render.mjs <spec.json>
//
// Spec: {url, token, room, chromium, text, jankMs}. Opens three pages on the same user and room:
// "sender" sends `text`, "watcher" only sees the room's events, and "janky" watches too but its
// animation frames come `jankMs` late (requestAnimationFrame wrapped before the page's script
// runs: a main thread too busy to paint during the whole reply, so only the end's flush renders
// the chunks). For each page it reports what the DOM did,
// recorded by a MutationObserver independent of the page's code (every text written into the
// reply, in order), the page's window.__renderStats, the Socket.IO frames received for the
// request and every client_timing frame the page sent on its WebSocket.
// Exit code 0 when everything ran, 3 on a failure (the output says which).
import { readFileSync } from "node:fs";
import { launchChromium } from "./chromium.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = Date.now();
const TERMINAL = ["done", "cancelled", "error", "rejected"];

function out(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

async function waitFor(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`timeout waiting for ${what}`);
}

function packet(payload) {
  if (typeof payload !== "string" || !payload.startsWith("42")) return null;
  try {
    const [event, data] = JSON.parse(payload.slice(2));
    return { event, data };
  } catch {
    return null;
  }
}

async function open(browser, name, jankMs = 0) {
  const context = await browser.newContext({ viewport: { width: 900, height: 760 } });
  if (jankMs > 0) {
    await context.addInitScript((delay) => {
      const raf = window.requestAnimationFrame.bind(window);
      window.requestAnimationFrame = (callback) => setTimeout(() => raf(callback), delay);
    }, jankMs);
  }
  const page = await context.newPage();
  const tab = { name, context, page, received: [], sent: [], errors: [] };
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => {
      const p = packet(payload);
      if (p) tab.received.push(p);
    });
    ws.on("framesent", ({ payload }) => {
      const p = packet(payload);
      if (p) tab.sent.push(p);
    });
  });
  page.on("pageerror", (err) => tab.errors.push(String(err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") tab.errors.push(msg.text());
  });
  await page.goto(`${spec.url}/?token=${encodeURIComponent(spec.token)}&room=${encodeURIComponent(spec.room)}`);
  const status = page.locator("#status");
  await waitFor(async () => (await status.getAttribute("data-state")) === "connected", 10000, `${name} connected`);
  // Every text node the page puts into a reply, in order, per request: the DOM writes as the
  // browser saw them, whichever code path made them.
  await page.evaluate(() => {
    window.__writes = {};
    new MutationObserver((records) => {
      for (const record of records) {
        const target = record.target;
        if (record.type !== "childList" || !(target instanceof Element) || !target.classList.contains("reply")) continue;
        const id = target.closest("li.turn").dataset.requestId;
        for (const node of record.addedNodes) (window.__writes[id] ||= []).push(node.textContent);
      }
    }).observe(document.getElementById("log"), { subtree: true, childList: true });
  });
  return tab;
}

function wireFor(tab, requestId) {
  return tab.received.filter(({ data }) => {
    const id = data && (data.requestId || (data.message && data.message.requestId));
    return id === requestId;
  });
}

async function settle(tab, requestId) {
  const turn = tab.page.locator(`li.turn[data-request-id="${requestId}"]`);
  await waitFor(async () => TERMINAL.includes(await turn.getAttribute("data-state")), 20000, `${tab.name}: end of ${requestId}`);
  await waitFor(async () => wireFor(tab, requestId).some((w) => w.event === "ai_message_end"), 5000, "ai_message_end");
  await tab.page.waitForTimeout(200); // a client_timing would be on the wire by now
  const shown = await turn.evaluate((li) => ({
    state: li.dataset.state,
    ttftMs: li.dataset.ttftMs ? Number(li.dataset.ttftMs) : null,
    totalMs: li.dataset.totalMs ? Number(li.dataset.totalMs) : null,
    replyText: li.querySelector(".reply").textContent,
    chunkRenders: Number(li.querySelector(".reply").dataset.chunkRenders),
    frameRenders: Number(li.querySelector(".reply").dataset.frameRenders),
    writes: window.__writes[li.dataset.requestId] || [],
    stats: window.__renderStats,
    lastClientTiming: window.__lastClientTiming || null,
  }));
  const events = wireFor(tab, requestId);
  out({
    kind: "tab",
    name: tab.name,
    requestId,
    ...shown,
    wire: events.map((w) => w.event),
    chunks: events.filter((w) => w.event === "ai_message_chunk").map((w) => w.data),
    end: (events.find((w) => w.event === "ai_message_end") || {}).data || null,
    clientTimings: tab.sent.filter((p) => p.event === "client_timing").map((p) => p.data),
    errors: tab.errors,
  });
}

const browser = await launchChromium(spec.chromium);
let code = 0;
const tabs = [];
try {
  const sender = await open(browser, "sender");
  const watcher = await open(browser, "watcher");
  const janky = await open(browser, "janky", spec.jankMs);
  tabs.push(sender, watcher, janky);
  const clickedAt = Date.now();
  await sender.page.fill("#message", spec.text);
  await sender.page.click("#send");
  const turn = sender.page.locator("li.turn").first();
  await waitFor(async () => (await turn.count()) > 0, 5000, "the new turn");
  const requestId = await turn.getAttribute("data-request-id");
  out({ kind: "sent", requestId, clickedAt });
  await settle(sender, requestId);
  for (const tab of [watcher, janky]) {
    await waitFor(async () => (await tab.page.locator(`li.turn[data-request-id="${requestId}"]`).count()) > 0, 5000, `${tab.name}: the turn`);
    await settle(tab, requestId);
  }
} catch (err) {
  out({ kind: "failed", detail: String(err && err.stack) });
  for (const tab of tabs) {
    const events = tab.received.map((p) => p.event);
    out({ kind: "wire", name: tab.name, received: events.slice(0, 5), count: events.length, last: tab.received.slice(-2), errors: tab.errors });
  }
  code = 3;
} finally {
  await browser.close();
}
out({ kind: "done", code });
process.exit(code);

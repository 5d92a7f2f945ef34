// Drives the bridge's try-it page (GET /) in headless Chromium with playwright-core and prints
// one JSON line per step result on stdout.
//
//   node page.mjs <spec.json>
//
// Spec: {url, token, chromium, steps: [...]}; the page is opened at `${url}/?token=...` and
// steps run in order on it:
//   {do: "send", text, label, via?: "enter"|"button"}   type, send, wait for the terminal state
//   {do: "sendAndCancel", text, label}                   send, Cancel after two chunk renders
//   {do: "exec", argv, env?, cwd?, sleepMs?}             run a command (flip a flag), then wait
//   {do: "screenshot", path}
//   {do: "openWithToken", token, label, screenshot?}     a fresh page; report its status line
// Each turn record carries what the page showed (data attributes, texts, every reply text seen
// by a MutationObserver while streaming) and what came over the WebSocket for that requestId.
// Exit code 0 when every step ran, 3 on a failure (the output says which).
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { launchChromium } from "./chromium.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = Date.now();
const TERMINAL = ["done", "cancelled", "error", "rejected"];
const wire = []; // every Socket.IO event frame received by any page: {event, data}

function out(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

function watchWire(page) {
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => {
      if (typeof payload !== "string" || !payload.startsWith("42")) return;
      try {
        const [event, data] = JSON.parse(payload.slice(2));
        wire.push({ event, data });
      } catch {
        // not an event packet
      }
    });
  });
}

function wireFor(requestId) {
  return wire.filter(({ data }) => {
    const id = data && (data.requestId || (data.message && data.message.requestId));
    return id === requestId;
  });
}

async function waitFor(predicate, timeoutMs = 15000, what = "condition") {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`timeout waiting for ${what}`);
}

async function open(browser, token) {
  const context = await browser.newContext({ viewport: { width: 900, height: 760 }, locale: "ko-KR" });
  const page = await context.newPage();
  watchWire(page);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(msg.text());
  });
  await page.goto(`${spec.url}/?token=${encodeURIComponent(token)}`);
  // Record every reply text the page shows, per request, as it changes.
  await page.evaluate(() => {
    window.__snapshots = {};
    const record = () => {
      for (const li of document.querySelectorAll("li.turn")) {
        const reply = li.querySelector(".reply");
        const list = (window.__snapshots[li.dataset.requestId] ||= []);
        const entry = { state: li.dataset.state, text: reply.textContent, hidden: reply.parentElement.hidden };
        const last = list[list.length - 1];
        if (!last || last.text !== entry.text || last.state !== entry.state) list.push(entry);
      }
    };
    new MutationObserver(record).observe(document.getElementById("log"), {
      subtree: true, childList: true, characterData: true, attributes: true,
    });
  });
  return { context, page, errors };
}

async function turnCount(page) {
  return page.locator("li.turn").count();
}

async function send(page, text, via) {
  const before = await turnCount(page);
  await page.fill("#message", text);
  if (via === "button") await page.click("#send");
  else await page.press("#message", "Enter");
  await waitFor(async () => (await turnCount(page)) > before, 5000, "the new turn");
  return page.locator("li.turn").nth(before).getAttribute("data-request-id");
}

async function settle(page, requestId) {
  const turn = page.locator(`li.turn[data-request-id="${requestId}"]`);
  await waitFor(async () => TERMINAL.includes(await turn.getAttribute("data-state")), 20000, `the end of ${requestId}`);
  // the sender's message_ack comes after the terminal event
  await waitFor(async () => wireFor(requestId).some((w) => w.event === "message_ack"), 5000, "message_ack");
  await page.waitForTimeout(50);
  return turn.evaluate((li) => ({
    requestId: li.dataset.requestId,
    state: li.dataset.state,
    path: li.dataset.path || null,
    code: li.dataset.code || null,
    ttftMs: li.dataset.ttftMs ? Number(li.dataset.ttftMs) : null,
    totalMs: li.dataset.totalMs ? Number(li.dataset.totalMs) : null,
    userText: li.querySelector(".bubble.user .text").textContent,
    userPending: li.querySelector(".bubble.user").classList.contains("pending"),
    replyText: li.querySelector(".reply").textContent,
    chunkRenders: Number(li.querySelector(".reply").dataset.chunkRenders),
    meta: li.querySelector(".meta").textContent,
    snapshots: window.__snapshots[li.dataset.requestId] || [],
  }));
}

function report(label, turn) {
  const events = wireFor(turn.requestId);
  out({
    kind: "turn",
    label,
    ...turn,
    wire: events.map((w) => w.event),
    end: (events.find((w) => w.event === "ai_message_end") || {}).data || null,
    chunks: events.filter((w) => w.event === "ai_message_chunk").map((w) => w.data),
    assistant: (events.find((w) => w.event === "new_message" && w.data.message.role === "assistant") || {}).data || null,
    messageAck: (events.find((w) => w.event === "message_ack") || {}).data || null,
  });
}

async function run(browser, main, step) {
  const { page } = main;
  switch (step.do) {
    case "send": {
      const requestId = await send(page, step.text, step.via);
      report(step.label, await settle(page, requestId));
      return;
    }
    case "sendAndCancel": {
      const requestId = await send(page, step.text, "button");
      const reply = page.locator(`li.turn[data-request-id="${requestId}"] .reply`);
      await waitFor(async () => Number(await reply.getAttribute("data-chunk-renders")) >= 2, 10000, "two chunks");
      out({ kind: "cancel", label: step.label, enabled: await page.isEnabled("#cancel") });
      await page.click("#cancel");
      report(step.label, await settle(page, requestId));
      return;
    }
    case "exec": {
      execFileSync(step.argv[0], step.argv.slice(1), {
        env: { ...process.env, ...(step.env || {}) },
        cwd: step.cwd,
        stdio: ["ignore", "ignore", "inherit"],
      });
      await page.waitForTimeout(step.sleepMs || 0);
      out({ kind: "exec", argv: step.argv.slice(-2) });
      return;
    }
    case "screenshot":
      await page.screenshot({ path: step.path, fullPage: false });
      out({ kind: "screenshot", path: step.path });
      return;
    case "openWithToken": {
      const other = await open(browser, step.token);
      const status = other.page.locator("#status");
      await waitFor(async () => (await status.getAttribute("data-state")) === "error", 10000, "the connect error");
      out({
        kind: "status",
        label: step.label,
        state: await status.getAttribute("data-state"),
        code: await status.getAttribute("data-code"),
        text: await status.textContent(),
        sendEnabled: await other.page.isEnabled("#send"),
      });
      if (step.screenshot) await other.page.screenshot({ path: step.screenshot });
      await other.context.close();
      return;
    }
    default:
      throw new Error(`unknown step ${step.do}`);
  }
}

const browser = await launchChromium(spec.chromium);
let code = 0;
try {
  const main = await open(browser, spec.token);
  const status = main.page.locator("#status");
  await waitFor(async () => (await status.getAttribute("data-state")) === "connected", 10000, "connected");
  out({ kind: "status", label: "main", state: "connected", text: await status.textContent() });
  for (const [index, step] of spec.steps.entries()) {
    try {
      await run(browser, main, step);
    } catch (err) {
      out({ kind: "failed", step: index, detail: String(err && err.stack) });
      code = 3;
      break;
    }
  }
  out({ kind: "pageErrors", errors: main.errors });
} catch (err) {
  out({ kind: "failed", step: -1, detail: String(err && err.stack) });
  code = 3;
} finally {
  await browser.close();
}
out({ kind: "done", code });
process.exit(code);

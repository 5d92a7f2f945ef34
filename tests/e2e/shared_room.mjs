// Two users in one room on the try-it page, each in their own headless Chromium context
// (playwright-core), and prints one JSON line per step with what each page showed.
//
//   node shared_room.mjs <spec.json>
//
// Spec: {url, chromium, room, alice: {user, token}, bob: {user, token}, ask, post, screenshot?}
// (screenshot: a path prefix; both pages are saved once the answer is in). Steps:
// Alice opens the room (she owns it) and adds Bob with the page's form; Bob opens it; Alice
// posts `post` (no AI); Bob asks the AI `ask`; both watch the answer stream; Bob closes his
// page. Exit code 0 when every step ran, 3 on a failure (the output says which).
import { readFileSync } from "node:fs";
import { launchChromium } from "./chromium.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = Date.now();

function out(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

async function waitFor(page, fn, arg, what, timeout = 15000) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 20 });
  } catch (err) {
    throw new Error(`timeout waiting for ${what}: ${err.message.split("\n")[0]}`);
  }
}

async function open(browser, who) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 760 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(msg.text());
  });
  const q = `?room=${encodeURIComponent(spec.room)}&token=${encodeURIComponent(who.token)}`;
  await page.goto(`${spec.url}/${q}`);
  await waitFor(page, () => document.getElementById("status").dataset.state === "connected", null, "connected");
  // Every reply text the page shows, per request, as it changes (streaming, not only the end).
  await page.evaluate(() => {
    window.__replies = {};
    new MutationObserver(() => {
      for (const li of document.querySelectorAll("li.turn")) {
        const text = li.querySelector(".reply").textContent;
        const list = (window.__replies[li.dataset.requestId] ||= []);
        if (text && list[list.length - 1] !== text) list.push(text);
      }
    }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
  });
  return { context, page, errors };
}

// What a page shows: who is online, the notices, every turn with its author and texts.
function view(page) {
  return page.evaluate(() => ({
    members: [...document.querySelectorAll("#members li")].map((li) => li.dataset.user),
    onlineCount: document.getElementById("online-count").textContent,
    notices: [...document.querySelectorAll("li.notice")].map((li) => ({ kind: li.dataset.kind, user: li.dataset.user, text: li.textContent })),
    turns: [...document.querySelectorAll("li.turn")].map((li) => ({
      requestId: li.dataset.requestId,
      state: li.dataset.state,
      kind: li.dataset.kind || null,
      user: li.dataset.user || null,
      who: li.querySelector(".bubble.user .who").textContent,
      userText: li.querySelector(".bubble.user .text").textContent,
      other: li.querySelector(".bubble.user").classList.contains("other"),
      reply: li.querySelector(".reply").textContent,
      replyHidden: li.querySelector(".bubble.assistant").hidden,
      chunkRenders: Number(li.querySelector(".reply").dataset.chunkRenders),
      replies: (window.__replies || {})[li.dataset.requestId] || [],
    })),
  }));
}

const browser = await launchChromium(spec.chromium);
let code = 0;
try {
  const alice = await open(browser, spec.alice);
  out({ step: "alice_open", alice: await view(alice.page) });

  await alice.page.fill("#member", spec.bob.user);
  await alice.page.click("#add");
  await waitFor(alice.page, (user) => [...document.querySelectorAll("li.notice")].some((n) => n.dataset.kind === "member_added" && n.dataset.user === user), spec.bob.user, "member_added notice");

  const bob = await open(browser, spec.bob);
  await waitFor(alice.page, (user) => !!document.querySelector(`#members li[data-user="${user}"]`), spec.bob.user, "bob online on alice's page");
  out({ step: "bob_open", alice: await view(alice.page), bob: await view(bob.page) });

  await alice.page.fill("#message", spec.post);
  await alice.page.click("#post");
  await waitFor(bob.page, (text) => [...document.querySelectorAll("li.turn .bubble.user .text")].some((t) => t.textContent === text), spec.post, "alice's post on bob's page");
  await waitFor(alice.page, () => document.querySelector('li.turn[data-kind="post"]')?.dataset.state === "posted", null, "post acked");
  out({ step: "posted", alice: await view(alice.page), bob: await view(bob.page) });

  await bob.page.fill("#message", spec.ask);
  await bob.page.press("#message", "Enter");
  const done = (text) => [...document.querySelectorAll("li.turn")].some((li) => li.querySelector(".bubble.user .text").textContent === text && li.dataset.state === "done");
  await waitFor(bob.page, done, spec.ask, "the answer on bob's page", 30000);
  await waitFor(alice.page, done, spec.ask, "the answer on alice's page", 30000);
  out({ step: "answered", alice: await view(alice.page), bob: await view(bob.page) });
  if (spec.screenshot) {
    await alice.page.screenshot({ path: `${spec.screenshot}-alice.png` });
    await bob.page.screenshot({ path: `${spec.screenshot}-bob.png` });
  }

  await bob.context.close();
  await waitFor(alice.page, (user) => !document.querySelector(`#members li[data-user="${user}"]`), spec.bob.user, "bob gone from alice's list");
  out({ step: "bob_left", alice: await view(alice.page), errors: [...alice.errors, ...bob.errors] });
} catch (err) {
  out({ step: "failed", detail: String(err && err.message) });
  code = 3;
} finally {
  await browser.close();
}
process.exit(code);

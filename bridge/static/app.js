// The try-it page: the official Socket.IO client (window.io, socket.io.min.js) speaking
// CONTRACT.md section 1 to the bridge that served this page. Plain JS, no build step.
//
// Every request is one "turn" (<li class="turn">) keyed by requestId: the user's message, the
// assistant's reply and a meta line (path, TTFT, total). State for tests and styling lives in
// data attributes: turn[data-state] pending|streaming|done|cancelled|error|rejected,
// turn[data-path], .reply[data-chunk-renders] (chunks whose text is on screen),
// .reply[data-frame-renders] (DOM writes of chunk text), #status[data-state] / [data-code].
//
// Chunks are rendered once per animation frame (issue 9, seed P3): ai_message_chunk only files
// the chunk under its seq and moves the contiguous prefix into the turn's pending text; one
// requestAnimationFrame callback per frame writes each turn's pending text into the DOM at once,
// so a burst of chunks costs one layout per frame, not one per chunk. ai_message_end and
// ai_message_error flush what is pending first. window.__renderStats counts what that code path
// did ({frames: rAF callbacks that wrote, flushes: chunk-text DOM writes, chunks: chunks taken}),
// for the page test; nothing reads it back.
//
// A room people share (issue 11): #members lists who is online (join_room's ack, then
// room_event joined/left), notices say who joined, left, was added or removed (li.system with
// data-kind and data-user), every user bubble names its author ("You" for this page's user,
// else the userId; li.turn[data-user]), Post sends a person-to-person message (post_message, no
// AI: li.turn[data-kind=post]), Ask AI a request whose answer streams to everyone in the room;
// one waiting for the room's earlier answers says so (li.turn[data-queue-position]). The
// owner adds members with the form under the list (add_member).
//
// For every request this page sent, the page reports its own P0 timings once, when the request
// ends (ai_message_end or ai_message_error): client_timing {requestId, sentAt (epoch ms of the
// send click), startMs, firstChunkMs, endMs (ms from the click to the receipt of
// ai_message_start, the first chunk, the terminal event)}. window.__lastClientTiming is the last
// payload emitted, set where it is emitted.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    connectForm: $("connect-form"), token: $("token"), room: $("room"),
    connect: $("connect"), disconnect: $("disconnect"), status: $("status"),
    chat: document.querySelector("main.chat"), log: $("log"), composer: $("composer"), message: $("message"),
    send: $("send"), post: $("post"), cancel: $("cancel"),
    members: $("members"), onlineCount: $("online-count"), addForm: $("add-member"),
    member: $("member"), add: $("add"),
  };
  const online = new Set(); // userIds online in the room
  let me = null; // this page's userId (the token's sub)
  const turns = new Map(); // requestId -> turn
  const seen = new Set(); // `${messageId}:${seq}`, de-duplication of replayed chunks
  const mine = []; // requestIds sent from this page and not finished, oldest first
  let socket = null;
  let roomId = null;
  const dirty = new Set(); // turns with pending chunk text, written at the next frame
  let frameRequested = false;
  const stats = { frames: 0, flushes: 0, chunks: 0 };
  window.__renderStats = stats;

  const now = () => performance.now();
  const ms = (value) => (value == null ? "–" : value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);

  function newRequestId() {
    if (window.crypto && crypto.randomUUID) return `web-${crypto.randomUUID()}`;
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
  }

  // The token's `sub`, for display only (the bridge verifies the token, the page does not).
  function tokenSub(token) {
    try {
      const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const json = new TextDecoder().decode(Uint8Array.from(atob(payload), (c) => c.charCodeAt(0)));
      const sub = JSON.parse(json).sub;
      return typeof sub === "string" ? sub : null;
    } catch {
      return null;
    }
  }

  function tokenUser(token) {
    const sub = tokenSub(token);
    return sub ? `“${sub}”` : "the token's user";
  }

  function author(userId) {
    return !userId || userId === me ? "You" : userId;
  }

  function setStatus(state, text, code) {
    els.status.dataset.state = state;
    if (code) els.status.dataset.code = code;
    else delete els.status.dataset.code;
    els.status.textContent = text;
  }

  function setConnected(connected) {
    els.disconnect.disabled = !(socket && (connected || socket.active));
    els.message.disabled = !connected;
    els.send.disabled = !connected;
    els.post.disabled = !connected;
    els.member.disabled = !connected;
    els.add.disabled = !connected;
    if (!connected) renderMembers([]);
    updateCancel();
  }

  // ---- people -----------------------------------------------------------------------------

  function renderMembers(users) {
    if (users) {
      online.clear();
      for (const user of users) online.add(user);
    }
    els.members.replaceChildren(
      ...[...online].sort().map((user) => {
        const li = document.createElement("li");
        li.dataset.user = user;
        li.textContent = user === me ? `${user} (you)` : user;
        if (user === me) li.classList.add("me");
        return li;
      }),
    );
    els.onlineCount.textContent = String(online.size);
  }

  function notice(kind, userId, text) {
    const li = document.createElement("li");
    li.className = "system notice";
    li.dataset.kind = kind;
    li.dataset.user = userId;
    li.textContent = text;
    els.log.append(li);
    scrollToEnd();
  }

  function onRoomEvent(data) {
    if (!data || data.roomId !== roomId || !data.userId) return;
    const user = data.userId;
    const who = user === me ? "You" : user;
    if (data.type === "joined") {
      online.add(user);
      notice("joined", user, `${who} joined the room`);
    } else if (data.type === "left") {
      online.delete(user);
      notice("left", user, `${who} left the room`);
    } else if (data.type === "member_added") {
      notice("member_added", user, `${who} ${user === me ? "were" : "was"} added to the room`);
    } else if (data.type === "member_removed") {
      online.delete(user);
      notice("member_removed", user, `${who} ${user === me ? "were" : "was"} removed from the room`);
      if (user === me) {
        setStatus("error", `You were removed from “${roomId}”.`, "FORBIDDEN");
        setConnected(false);
      }
    }
    renderMembers();
  }

  function updateCancel() {
    els.cancel.disabled = !(socket && socket.connected && mine.length);
  }

  function scrollToEnd() {
    els.chat.scrollTop = els.chat.scrollHeight;
  }

  function system(text, kind) {
    const li = document.createElement("li");
    li.className = `system ${kind || ""}`.trim();
    li.textContent = text;
    els.log.append(li);
    scrollToEnd();
  }

  function bubble(role, label) {
    const box = document.createElement("div");
    box.className = `bubble ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = label;
    const text = document.createElement("p");
    text.className = "text";
    box.append(who, text);
    return { box, text };
  }

  // One turn per requestId: created when this page sends, or on the first event of a request
  // sent elsewhere (another tab in the room).
  function turnFor(requestId) {
    let turn = turns.get(requestId);
    if (turn) return turn;
    const li = document.createElement("li");
    li.className = "turn";
    li.dataset.requestId = requestId;
    li.dataset.state = "pending";
    const user = bubble("user", "You");
    user.who = user.box.querySelector(".who");
    const reply = bubble("assistant", "Assistant");
    reply.box.hidden = true;
    reply.text.classList.add("reply");
    reply.text.dataset.chunkRenders = "0";
    reply.text.dataset.frameRenders = "0";
    const meta = document.createElement("p");
    meta.className = "meta";
    li.append(user.box, reply.box, meta);
    els.log.append(li);
    turn = {
      requestId, li, user, reply, meta, messageId: null,
      chunks: [], // chunk text by seq, holes until they come
      taken: 0, // chunks[0..taken) are contiguous and in `rendered` or `pending`
      rendered: "", // the chunk text in the DOM
      pending: "", // contiguous chunk text not in the DOM yet
      renders: 0, // chunks whose text is in the DOM
      frameRenders: 0, // DOM writes of chunk text
      sentAt: null, sentEpochMs: null, startAt: null, firstChunkAt: null, endedAt: null,
      timingSent: false, path: null, note: "",
    };
    turns.set(requestId, turn);
    return turn;
  }

  function renderMeta(turn) {
    const parts = [];
    if (turn.path) parts.push(`path ${turn.path}`);
    if (turn.sentAt != null) {
      parts.push(`TTFT ${turn.firstChunkAt == null ? "–" : ms(turn.firstChunkAt - turn.sentAt)}`);
      parts.push(`total ${turn.endedAt == null ? "…" : ms(turn.endedAt - turn.sentAt)}`);
    }
    if (turn.chunks.length) parts.push(`${turn.chunks.length} chunks`);
    if (turn.note) parts.push(turn.note);
    turn.meta.textContent = parts.join(" · ");
    if (turn.path) turn.li.dataset.path = turn.path;
    if (turn.sentAt != null && turn.firstChunkAt != null) turn.li.dataset.ttftMs = String(Math.round(turn.firstChunkAt - turn.sentAt));
    if (turn.sentAt != null && turn.endedAt != null) turn.li.dataset.totalMs = String(Math.round(turn.endedAt - turn.sentAt));
  }

  function setState(turn, state) {
    turn.li.dataset.state = state;
    if (["done", "cancelled", "error", "rejected"].includes(state)) {
      if (turn.endedAt == null) turn.endedAt = now();
    }
    renderMeta(turn);
  }

  function finish(requestId) {
    const index = mine.indexOf(requestId);
    if (index >= 0) mine.splice(index, 1);
    updateCancel();
  }

  function showReply(turn, text) {
    turn.reply.box.hidden = false;
    turn.reply.text.textContent = text;
    scrollToEnd();
  }

  // One DOM write of the turn's pending chunk text; false when nothing was pending.
  function flushTurn(turn) {
    dirty.delete(turn);
    if (!turn.pending) return false;
    turn.rendered += turn.pending;
    turn.pending = "";
    turn.renders = turn.taken;
    turn.frameRenders += 1;
    stats.flushes += 1;
    turn.reply.box.hidden = false;
    turn.reply.text.textContent = turn.rendered;
    turn.reply.text.dataset.chunkRenders = String(turn.renders);
    turn.reply.text.dataset.frameRenders = String(turn.frameRenders);
    if (turn.li.dataset.state !== "streaming") setState(turn, "streaming");
    else renderMeta(turn);
    return true;
  }

  function onFrame() {
    frameRequested = false;
    let wrote = false;
    for (const turn of [...dirty]) wrote = flushTurn(turn) || wrote;
    if (wrote) {
      stats.frames += 1;
      scrollToEnd();
    }
  }

  function scheduleFlush(turn) {
    dirty.add(turn);
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(onFrame);
  }

  // The page's own timings of a request it sent, once, at its end (CONTRACT.md: client_timing).
  function reportTiming(turn) {
    if (turn.sentAt == null || turn.timingSent || !socket) return;
    turn.timingSent = true;
    const since = (at) => (at == null ? undefined : Math.max(0, Math.round(at - turn.sentAt)));
    const timing = {
      requestId: turn.requestId,
      sentAt: turn.sentEpochMs,
      startMs: since(turn.startAt),
      firstChunkMs: since(turn.firstChunkAt),
      endMs: since(turn.endedAt),
    };
    window.__lastClientTiming = timing;
    socket.emit("client_timing", timing);
  }

  // ---- bridge -> client -------------------------------------------------------------------

  function onNewMessage(data) {
    const message = data && data.message;
    if (!message || !message.requestId) return;
    const turn = turnFor(message.requestId);
    if (message.role === "user") {
      turn.user.who.textContent = author(message.userId);
      if (message.userId) turn.li.dataset.user = message.userId;
      if (message.userId && message.userId !== me) turn.user.box.classList.add("other");
      turn.user.text.textContent = message.content;
      turn.user.box.classList.remove("pending");
      if (turn.li.dataset.state === "pending") setState(turn, "sent");
    } else if (message.role === "assistant") {
      // The complete path: the whole reply at once, no ai_message_* events.
      turn.messageId = message.id;
      showReply(turn, message.content);
      setState(turn, "done");
    }
    scrollToEnd();
  }

  function onStart(data) {
    const turn = turnFor(data.requestId);
    turn.messageId = data.messageId;
    if (turn.startAt == null) turn.startAt = now();
    if (data.queuePosition > 0 && turn.firstChunkAt == null) {
      turn.li.dataset.queuePosition = String(data.queuePosition);
      turn.note = `waiting for the room (${data.queuePosition} ahead)`;
      renderMeta(turn);
    }
    turn.reply.box.hidden = false;
    turn.reply.box.classList.add("streaming");
    if (!["done", "cancelled", "error"].includes(turn.li.dataset.state)) setState(turn, "streaming");
  }

  function onChunk(data) {
    const key = `${data.messageId}:${data.seq}`;
    if (seen.has(key)) return;
    seen.add(key);
    const turn = turnFor(data.requestId);
    if (["done", "cancelled", "error"].includes(turn.li.dataset.state)) return;
    turn.chunks[data.seq] = data.chunk;
    stats.chunks += 1;
    if (turn.firstChunkAt == null) {
      turn.firstChunkAt = now();
      if (turn.note.startsWith("waiting for the room")) turn.note = "";
    }
    // Only the contiguous prefix (seq 0..n without a hole) goes to the screen, in seq order.
    const before = turn.taken;
    while (turn.taken < turn.chunks.length && turn.chunks[turn.taken] !== undefined) {
      turn.pending += turn.chunks[turn.taken];
      turn.taken += 1;
    }
    if (turn.taken === before) return;
    turn.reply.box.classList.add("streaming");
    scheduleFlush(turn);
  }

  function onEnd(data) {
    const turn = turnFor(data.requestId);
    turn.messageId = data.messageId;
    flushTurn(turn); // the chunks so far first, then the end's content over them
    turn.reply.box.classList.remove("streaming");
    showReply(turn, data.content); // authoritative
    if (data.finishReason && data.finishReason !== "stop") turn.note = `finish ${data.finishReason}`;
    setState(turn, data.finishReason === "cancelled" ? "cancelled" : "done");
    reportTiming(turn);
  }

  function onError(data) {
    const turn = turnFor(data.requestId);
    flushTurn(turn);
    turn.reply.box.classList.remove("streaming");
    turn.reply.box.hidden = false;
    turn.reply.box.classList.add("failed");
    turn.li.dataset.code = data.code;
    turn.note = `error ${data.code}${data.retryable ? " (retryable)" : ""}`;
    turn.reply.text.textContent = `${turn.reply.text.textContent}${turn.reply.text.textContent ? "\n" : ""}⚠ ${data.code}: ${data.message}`;
    setState(turn, "error");
    reportTiming(turn);
  }

  function onMessageAck(data) {
    const turn = turnFor(data.requestId);
    turn.path = data.path;
    if (!data.ok && data.code) {
      turn.li.dataset.code = data.code;
      if (!turn.note) turn.note = `error ${data.code}`;
    }
    renderMeta(turn);
    finish(data.requestId);
  }

  // ---- client -> bridge -------------------------------------------------------------------

  function join(room) {
    socket.emit("join_room", { roomId: room }, (ack) => {
      if (ack && ack.ok) {
        roomId = ack.roomId;
        renderMembers(ack.members || []);
        setStatus("connected", `Connected as ${tokenUser(socket.auth.token)} · room “${roomId}”.`);
        setConnected(true);
        els.message.focus();
      } else {
        const code = (ack && ack.code) || "INTERNAL";
        setStatus("error", `Cannot join “${room}”: ${code}${ack && ack.message ? ` — ${ack.message}` : ""}`, code);
      }
    });
  }

  function connect() {
    if (socket) disconnect();
    const token = els.token.value.trim();
    const room = els.room.value.trim() || "demo";
    me = tokenSub(token);
    setStatus("connecting", "Connecting…");
    socket = window.io({ auth: { token }, transports: ["websocket", "polling"] });
    els.disconnect.disabled = false;
    socket.on("connect", () => join(room));
    socket.on("connect_error", (err) => {
      const data = err && err.data;
      const code = (data && data.code) || "CONNECT_FAILED";
      const detail = (data && data.message) || (err && err.message) || "";
      const retrying = socket && socket.active ? " (retrying…)" : "";
      setStatus("error", `Connect error ${code}${detail ? `: ${detail}` : ""}${retrying}`, code);
      setConnected(false);
    });
    socket.on("disconnect", (reason) => {
      setStatus("disconnected", `Disconnected (${reason})${socket && socket.active ? ", reconnecting…" : "."}`);
      setConnected(false);
    });
    socket.on("new_message", onNewMessage);
    socket.on("ai_message_start", onStart);
    socket.on("ai_message_chunk", onChunk);
    socket.on("ai_message_end", onEnd);
    socket.on("ai_message_error", onError);
    socket.on("message_ack", onMessageAck);
    socket.on("room_event", onRoomEvent);
  }

  function disconnect() {
    if (!socket) return;
    const old = socket;
    socket = null;
    old.removeAllListeners();
    old.disconnect();
    mine.length = 0;
    setStatus("idle", "Not connected.");
    setConnected(false);
  }

  function send() {
    const content = els.message.value;
    if (!socket || !socket.connected || !content.trim()) return;
    const requestId = newRequestId();
    const turn = turnFor(requestId);
    turn.sentAt = now();
    turn.sentEpochMs = Date.now();
    turn.user.text.textContent = content;
    turn.user.box.classList.add("pending");
    mine.push(requestId);
    updateCancel();
    renderMeta(turn);
    scrollToEnd();
    els.message.value = "";
    socket.emit("send_message", { roomId, content, requestId }, (ack) => {
      if (ack && ack.ok) {
        if (!turn.path) turn.path = ack.path;
        renderMeta(turn);
      } else {
        const code = (ack && ack.code) || "INTERNAL";
        turn.li.dataset.code = code;
        turn.note = `rejected ${code}${ack && ack.message ? `: ${ack.message}` : ""}`;
        turn.user.box.classList.remove("pending");
        setState(turn, "rejected");
        finish(requestId);
      }
    });
  }

  // A person-to-person message: stored in the room's history, sent to the room, no AI.
  function post() {
    const content = els.message.value;
    if (!socket || !socket.connected || !content.trim()) return;
    const requestId = newRequestId();
    const turn = turnFor(requestId);
    turn.li.dataset.kind = "post";
    turn.user.text.textContent = content;
    turn.user.box.classList.add("pending");
    scrollToEnd();
    els.message.value = "";
    socket.emit("post_message", { roomId, content, requestId }, (ack) => {
      turn.user.box.classList.remove("pending");
      if (ack && ack.ok) {
        setState(turn, "posted");
      } else {
        const code = (ack && ack.code) || "INTERNAL";
        turn.li.dataset.code = code;
        turn.note = `rejected ${code}${ack && ack.message ? `: ${ack.message}` : ""}`;
        setState(turn, "rejected");
      }
    });
  }

  function addMember() {
    const userId = els.member.value.trim();
    if (!socket || !socket.connected || !userId) return;
    socket.emit("add_member", { roomId, userId }, (ack) => {
      if (ack && ack.ok) {
        els.member.value = "";
      } else {
        const code = (ack && ack.code) || "INTERNAL";
        notice("add_failed", userId, `Cannot add ${userId}: ${code}${ack && ack.message ? ` — ${ack.message}` : ""}`);
      }
    });
  }

  function cancel() {
    const requestId = mine[mine.length - 1];
    if (!socket || !requestId) return;
    els.cancel.disabled = true;
    socket.emit("cancel_message", { requestId }, (ack) => {
      if (ack && !ack.ok) {
        const turn = turnFor(requestId);
        turn.note = `cancel refused ${ack.code}`;
        renderMeta(turn);
      }
      updateCancel();
    });
  }

  // ---- wiring -----------------------------------------------------------------------------

  els.connectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  els.disconnect.addEventListener("click", disconnect);
  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  els.message.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition (Korean
    // input) is not a send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      send();
    }
  });
  els.cancel.addEventListener("click", cancel);
  els.post.addEventListener("click", post);
  els.addForm.addEventListener("submit", (event) => {
    event.preventDefault();
    addMember();
  });

  const params = new URLSearchParams(window.location.search);
  if (params.get("room")) els.room.value = params.get("room");
  if (params.get("token")) {
    els.token.value = params.get("token");
    connect();
  } else {
    system("Paste a JWT (python -m bridge token <user>) and press Connect.");
    els.token.focus();
  }
})();

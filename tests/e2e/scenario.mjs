// Runs one scenario against a bridge with the official socket.io-client and prints every
// received event, ack and connection change as one JSON line on stdout.
//
//   node scenario.mjs <scenario.json>
//
// Scenario: {url, sockets: {name: {auth?, extraHeaders?, transports?, url?}}, steps: [...]};
// steps:
//   {do: "connect", socket}                      wait for connect or connect_error
//   {do: "emit", socket, event, args, ack?, wait?}  emit (ack: false sends none; wait: false
//                                                 records the ack when it comes, not waiting)
//   {do: "waitFor", socket, event, count?, timeoutMs?}   until `count` such events arrived
//   {do: "sleep", ms}
//   {do: "disconnect", socket}
// Exit code 0 when every step ran, 3 on a step timeout (the output says which).
import { readFileSync } from "node:fs";
import { io } from "socket.io-client";

const scenario = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = Date.now();
const sockets = {};
const counts = {};

function out(record) {
  process.stdout.write(JSON.stringify({ t: Date.now() - started, ...record }) + "\n");
}

function count(name, event) {
  return (counts[name] && counts[name][event]) || 0;
}

function waitUntil(predicate, timeoutMs) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + timeoutMs;
    const tick = () => {
      if (predicate()) return resolve();
      if (Date.now() > deadline) return reject(new Error("timeout"));
      setTimeout(tick, 5);
    };
    tick();
  });
}

function open(name, spec) {
  const socket = io(spec.url || scenario.url, {
    auth: spec.auth,
    extraHeaders: spec.extraHeaders,
    transports: spec.transports || ["websocket"],
    reconnection: false,
    forceNew: true,
    timeout: 10000,
  });
  counts[name] = {};
  socket.onAny((event, ...args) => {
    counts[name][event] = (counts[name][event] || 0) + 1;
    out({ socket: name, kind: "event", event, data: args.length === 1 ? args[0] : args });
  });
  socket.on("connect", () => {
    counts[name].connect = (counts[name].connect || 0) + 1;
    out({ socket: name, kind: "connect" });
  });
  socket.on("connect_error", (err) => {
    counts[name].connect_error = (counts[name].connect_error || 0) + 1;
    out({ socket: name, kind: "connect_error", message: err.message, data: err.data ?? null });
  });
  socket.on("disconnect", (reason) => {
    counts[name].disconnect = (counts[name].disconnect || 0) + 1;
    out({ socket: name, kind: "disconnect", reason });
  });
  sockets[name] = socket;
  return socket;
}

async function run(step) {
  const timeoutMs = step.timeoutMs || 15000;
  switch (step.do) {
    case "connect": {
      open(step.socket, scenario.sockets[step.socket] || {});
      await waitUntil(
        () => count(step.socket, "connect") + count(step.socket, "connect_error") > 0,
        timeoutMs,
      );
      return;
    }
    case "emit": {
      const socket = sockets[step.socket];
      const args = step.args || [];
      if (step.ack === false) {
        socket.emit(step.event, ...args);
        return;
      }
      // The ack is printed from the callback itself (called while the packet is processed),
      // not after an awaited promise: events that arrive in the same read would otherwise be
      // printed before it and the recorded order would not be the arrival order.
      const acked = new Promise((resolve, reject) => {
        socket.timeout(timeoutMs).emit(step.event, ...args, (err, ack) => {
          if (err) {
            out({ socket: step.socket, kind: "ack_timeout", event: step.event, label: step.label });
            return reject(err);
          }
          out({ socket: step.socket, kind: "ack", event: step.event, label: step.label, data: ack });
          resolve();
        });
      });
      if (step.wait === false) {
        acked.catch(() => {});  // recorded as ack_timeout; the test counts it
        return;
      }
      await acked;
      return;
    }
    case "waitFor":
      await waitUntil(() => count(step.socket, step.event) >= (step.count || 1), timeoutMs);
      return;
    case "sleep":
      await new Promise((resolve) => setTimeout(resolve, step.ms));
      return;
    case "disconnect":
      sockets[step.socket].disconnect();
      return;
    default:
      throw new Error(`unknown step ${step.do}`);
  }
}

let code = 0;
for (const [index, step] of scenario.steps.entries()) {
  try {
    await run(step);
  } catch (err) {
    out({ kind: "timeout", step: index, detail: String(err && err.message) });
    code = 3;
    break;
  }
}
for (const socket of Object.values(sockets)) socket.disconnect();
out({ kind: "done", code });
process.exit(code);

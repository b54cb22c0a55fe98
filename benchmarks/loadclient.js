// Closed-loop load client playing the AIS target: N connections, each sends one object and
// waits for its reply before the next (as a target worker does), for a fixed duration.
//   node loadclient.js <ws|hpush> <base-url> <size-bytes> <connections> <seconds>
// Prints one JSON line: {mode, size, connections, requests, errors, seconds, rps, mib_s, p50_ms, p99_ms}
"use strict";
const http = require("http");
const WebSocket = require("ws");

const [mode, base, sizeArg, connArg, secArg] = process.argv.slice(2);
const size = parseInt(sizeArg, 10);
const conns = parseInt(connArg, 10);
const seconds = parseFloat(secArg);
const payload = Buffer.alloc(size, 0x61);
const control = Buffer.from(JSON.stringify({ path: "bench/obj" }));
const latencies = [];
let requests = 0;
let errors = 0;
const t0 = process.hrtime.bigint();
const deadline = Date.now() + seconds * 1000;

function record(start, ok, n) {
  latencies.push(Number(process.hrtime.bigint() - start) / 1e6);
  if (ok && n === size) requests++;
  else errors++;
}

function runHpush() {
  const agent = new http.Agent({ keepAlive: true, maxSockets: conns });
  const url = new URL(base + "/bench/obj");
  return new Promise((resolve) => {
    let live = conns;
    const loop = () => {
      if (Date.now() >= deadline) { if (--live === 0) { agent.destroy(); resolve(); } return; }
      const start = process.hrtime.bigint();
      const req = http.request({
        host: url.hostname, port: url.port, path: url.pathname, method: "PUT", agent,
        headers: { "Content-Length": size },
      }, (res) => {
        let n = 0;
        res.on("data", (c) => { n += c.length; });
        res.on("end", () => { record(start, res.statusCode === 200, n); loop(); });
      });
      req.on("error", () => { errors++; loop(); });
      req.end(payload);
    };
    for (let i = 0; i < conns; i++) loop();
  });
}

function runWs() {
  return new Promise((resolve) => {
    let live = conns;
    for (let i = 0; i < conns; i++) {
      const ws = new WebSocket(base.replace(/^http/, "ws") + "/ws", { perMessageDeflate: false, maxPayload: 0 });
      let start;
      const send = () => {
        if (Date.now() >= deadline) { ws.close(1000); return; }
        start = process.hrtime.bigint();
        ws.send(control, { binary: true });
        ws.send(payload, { binary: true });
      };
      ws.on("open", send);
      ws.on("message", (data, isBinary) => { record(start, isBinary, data.length); send(); });
      ws.on("error", () => { errors++; });
      ws.on("close", () => { if (--live === 0) resolve(); });
    }
  });
}

(mode === "ws" ? runWs() : runHpush()).then(() => {
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  latencies.sort((a, b) => a - b);
  const pct = (p) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null;
  console.log(JSON.stringify({
    mode, size, connections: conns, requests, errors, seconds: +secs.toFixed(3),
    rps: +(requests / secs).toFixed(1), mib_s: +((requests * size) / secs / 1048576).toFixed(2),
    p50_ms: pct(0.5) && +pct(0.5).toFixed(3), p99_ms: pct(0.99) && +pct(0.99).toFixed(3),
  }));
});

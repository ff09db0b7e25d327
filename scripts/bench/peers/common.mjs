// Shared by graphile.mjs and pgboss.mjs, the peer job queues of scripts/bench/run.sh peers.
//
// Environment (set by scripts/bench/peers.py): DATABASE_URL (a fresh database), MOCK_URL
// (the mock provider), N (jobs), C (jobs in flight at most), MODE (run | idle).
//
// Protocol on stdout, one JSON object a line:
//   run:  {"event":"added",...} after the N jobs are in; then it waits for "go" on stdin,
//         starts the worker and, once the N-th job is completed in the database, prints
//         {"event":"done","elapsed_s":...,"cpu_s":...,"failed":...}; it stops the worker
//         and exits when stdin closes (so that its connections end after the caller has
//         read PostgreSQL's CPU counters, not while it reads them).
//   idle: {"event":"started"} once the worker runs on the empty queue; it exits when
//         stdin closes or on SIGTERM.
// The job: POST {"to", "content"} to MOCK_URL/send with Idempotency-Key: <job number
// 1..N>; a non-2xx answer fails the job.

import { createInterface } from "node:readline";
import { Pool } from "undici";

export const DATABASE_URL = need("DATABASE_URL");
export const MOCK_URL = need("MOCK_URL");
export const N = Number(process.env.N ?? "0");
export const C = Number(need("C"));
export const MODE = process.env.MODE ?? "run";

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
}

export function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

// A keep-alive pool of C connections to the mock provider (undici, as Node's own fetch).
const provider = new Pool(MOCK_URL, { connections: C, pipelining: 1 });

// The payload of job k (1..N): what the dispatcher's seeded rows carry, in spirit.
export function payload(k) {
  return { k, to: `+1555${String(k).padStart(7, "0")}`, content: `bench message ${k}` };
}

// The job body: one POST, throws on a non-2xx answer.
export async function deliver({ k, to, content }) {
  const { statusCode, body } = await provider.request({
    path: "/send",
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": String(k) },
    body: JSON.stringify({ to, content }),
  });
  await body.dump();
  if (statusCode < 200 || statusCode >= 300) {
    throw new Error(`provider answered ${statusCode} for ${k}`);
  }
}

export function chunks(total, size) {
  const out = [];
  for (let first = 1; first <= total; first += size) {
    out.push([first, Math.min(total, first + size - 1)]);
  }
  return out;
}

// Resolves on the line "go" on stdin; exits the process when stdin closes first.
const lines = createInterface({ input: process.stdin });
const waiting = [];
let stdinClosed = false;
lines.on("line", (line) => {
  if (line.trim() === "go") waiting.splice(0).forEach((resolve) => resolve());
});
lines.on("close", () => {
  stdinClosed = true;
  waiting.splice(0).forEach((resolve) => resolve("closed"));
});
export function waitForGo() {
  return new Promise((resolve) => (stdinClosed ? resolve("closed") : waiting.push(resolve)));
}
export function waitForEnd() {
  return new Promise((resolve) => {
    if (stdinClosed) return resolve();
    lines.on("close", resolve);
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
}

// The clock of a run: from worker start (t0) to the N-th job completed in the database.
// `completedInProcess` counts handler successes; once it reaches N, `remaining()` (a
// query of the queue's own tables) is polled every 2 ms until it answers 0, so the
// database is not polled during the run itself.
export async function measure(start, remaining) {
  let done = 0;
  let failed = 0;
  let reachedN;
  const allDone = new Promise((resolve) => (reachedN = resolve));
  const counters = {
    ok() {
      done += 1;
      if (done >= N) reachedN();
    },
    fail() {
      failed += 1;
    },
  };
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const stop = await start(counters);
  await allDone;
  const tHandlers = performance.now();
  for (;;) {
    if ((await remaining()) === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  const t1 = performance.now();
  const cpu = process.cpuUsage(cpu0);
  emit("done", {
    elapsed_s: (t1 - t0) / 1000,
    handlers_s: (tHandlers - t0) / 1000,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    completed_in_process: done,
    failed,
  });
  await waitForEnd();
  await stop();
  await provider.close();
}

export async function closeProvider() {
  await provider.close();
}

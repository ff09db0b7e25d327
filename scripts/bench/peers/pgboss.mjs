// pg-boss 12 in the peer benchmark (scripts/bench/run.sh peers): one queue (policy
// standard), one `work` worker (localConcurrency 1) fetching batchSize 500 jobs at a time,
// burstWhenBatchFull on (it fetches the next batch at once while batches come back full;
// without it a worker waits pollingIntervalSeconds, 2 s by default, after every batch),
// pollingIntervalSeconds 0.5 (the minimum), perJobResults on (each job completed or
// failed on its own). Inside a batch at most C jobs are in flight. Jobs are added in bulk
// with insert(), 10,000 a call, before the worker starts. See common.mjs.

import { PgBoss } from "pg-boss";
import pg from "pg";
import { C, DATABASE_URL, MODE, N, chunks, closeProvider, deliver, emit, measure, payload, waitForEnd, waitForGo } from "./common.mjs";

const QUEUE = "send";
const BATCH = 500;

const boss = new PgBoss({ connectionString: DATABASE_URL });
boss.on("error", (err) => console.error(`[pg-boss error] ${err.message}`));
await boss.start();
await boss.createQueue(QUEUE);

let counters = { ok() {}, fail() {} };

// The batch handler: the jobs of one fetch, C at a time, each settled on its own.
async function handler(jobs) {
  const results = new Array(jobs.length);
  let next = 0;
  async function lane() {
    while (next < jobs.length) {
      const i = next++;
      try {
        await deliver(jobs[i].data);
        results[i] = { id: jobs[i].id, status: "completed" };
        counters.ok();
      } catch (err) {
        results[i] = { id: jobs[i].id, status: "failed", output: { message: err.message } };
        counters.fail();
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(C, jobs.length) }, lane));
  return results;
}

const workOptions = {
  batchSize: BATCH,
  localConcurrency: 1,
  burstWhenBatchFull: true,
  pollingIntervalSeconds: 0.5,
  perJobResults: true,
};

if (MODE === "idle") {
  await boss.work(QUEUE, workOptions, handler);
  emit("started");
  await waitForEnd();
  await boss.stop({ graceful: true, timeout: 10_000 });
  await closeProvider();
  process.exit(0);
}

const tAdd = performance.now();
for (const [first, last] of chunks(N, 10_000)) {
  const jobs = [];
  for (let k = first; k <= last; k++) jobs.push({ data: payload(k) });
  await boss.insert(QUEUE, jobs);
}
emit("added", { add_s: (performance.now() - tAdd) / 1000 });

if ((await waitForGo()) === "closed") process.exit(1);

const db = new pg.Client({ connectionString: DATABASE_URL });
await db.connect();
await measure(
  async (c) => {
    counters = c;
    await boss.work(QUEUE, workOptions, handler);
    return () => boss.stop({ graceful: true, timeout: 10_000 });
  },
  async () =>
    Number((await db.query("SELECT count(*) FROM pgboss.job WHERE name = $1 AND state <> 'completed'", [QUEUE])).rows[0].count),
);
await db.end();
process.exit(0);

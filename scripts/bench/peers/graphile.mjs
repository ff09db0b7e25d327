// graphile-worker, "best configuration" of the peer benchmark (scripts/bench/run.sh peers):
// a local queue of 500 jobs (one fetch locks 500), completions batched
// (completeJobBatchDelay 0, failJobBatchDelay 0), `concurrency` C, a pool of
// max(10, C + 2) connections (the size graphile-worker's documentation recommends),
// info/debug logging off (it logs a line per job otherwise). Jobs are added in bulk with
// WorkerUtils.addJobs, 10,000 a call, before the worker starts. See common.mjs.

import { Logger, makeWorkerUtils, run } from "graphile-worker";
import pg from "pg";
import { C, DATABASE_URL, MODE, N, chunks, closeProvider, deliver, emit, measure, payload, waitForEnd, waitForGo } from "./common.mjs";

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[graphile-worker ${level}] ${message}`);
});

const preset = {
  worker: {
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};

let counters = { ok() {}, fail() {} };
const taskList = {
  send: async (job) => {
    try {
      await deliver(job);
    } catch (err) {
      counters.fail();
      throw err;
    }
    counters.ok();
  },
};

function startWorker() {
  return run({
    connectionString: DATABASE_URL,
    concurrency: C,
    maxPoolSize: Math.max(10, C + 2),
    noHandleSignals: true,
    logger,
    taskList,
    preset,
  });
}

const utils = await makeWorkerUtils({ connectionString: DATABASE_URL, logger });
await utils.migrate();

if (MODE === "idle") {
  const runner = await startWorker();
  emit("started");
  await waitForEnd();
  await runner.stop();
  await utils.release();
  await closeProvider();
  process.exit(0);
}

const tAdd = performance.now();
for (const [first, last] of chunks(N, 10_000)) {
  const specs = [];
  for (let k = first; k <= last; k++) specs.push({ identifier: "send", payload: payload(k) });
  await utils.addJobs(specs);
}
await utils.release();
emit("added", { add_s: (performance.now() - tAdd) / 1000 });

if ((await waitForGo()) === "closed") process.exit(1);

const db = new pg.Client({ connectionString: DATABASE_URL });
await db.connect();
await measure(
  async (c) => {
    counters = c;
    const runner = await startWorker();
    return () => runner.stop();
  },
  async () => Number((await db.query("SELECT count(*) FROM graphile_worker._private_jobs")).rows[0].count),
);
await db.end();
process.exit(0);

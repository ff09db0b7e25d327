// The operator console. Plain JavaScript, no build step: everything it shows or does
// goes through this replica's public /api (relative URLs, so any prefix or load
// balancer in front keeps working), with the operator's token when API_TOKEN is set.
// Data is put into the page with textContent only: message contents are user input.
"use strict";

(() => {
  const API = "../api/";
  const TOKEN_KEY = "message-dispatcher.api-token";
  const REFRESH_MS = 1500; // plus the requests themselves: a view is never older than ~2 s
  const PAGE_SIZE = 25;
  const CHART_MINUTES = 15;
  const STATUSES = ["pending", "sending", "sent", "failed", "expired", "cancelled", "blocked"];

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, children = []) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  };

  // ---------------------------------------------------------------- the API ---
  let token = sessionStorage.getItem(TOKEN_KEY);
  let waitingForToken = false;

  class ApiError extends Error {
    constructor(status, body, fallback) {
      const error = (body && body.error) || {};
      super(error.message || fallback || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || "";
      this.field = error.field || null;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (err) {
      throw new ApiError(0, null, "this replica cannot be reached");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      // not JSON: the error below says the status
    }
    if (response.status === 401) {
      askForToken(token
        ? "The token was refused. Enter the API token of this cluster (API_TOKEN)."
        : null);
      throw new ApiError(401, data, "an API token is required");
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // ------------------------------------------------------------------- token ---
  function askForToken(reason) {
    waitingForToken = true;
    $("main").hidden = true;
    $("pause-notice").hidden = true;
    pauseShown = null;
    $("token-panel").hidden = false;
    if (reason) $("token-reason").textContent = reason;
    setLive("bad", "API token required");
    if (document.activeElement !== $("token-input")) $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    token = value;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-panel").hidden = true;
    $("main").hidden = false;
    $("forget-token").hidden = false;
    waitingForToken = false;
    refreshSoon(0);
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    $("forget-token").hidden = true;
    refreshSoon(0);
  });
  $("forget-token").hidden = !token;

  // ---------------------------------------------------------------- helpers ---
  const pad = (n) => String(n).padStart(2, "0");
  function formatTime(text) {
    if (!text) return "–";
    const t = new Date(text);
    return `${t.getUTCFullYear()}-${pad(t.getUTCMonth() + 1)}-${pad(t.getUTCDate())} ` +
      `${pad(t.getUTCHours())}:${pad(t.getUTCMinutes())}:${pad(t.getUTCSeconds())} UTC`;
  }
  function formatAge(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }
  const ago = (text) => (text ? `${formatAge((Date.now() - new Date(text)) / 1000)} ago` : "–");
  const statusBadge = (status) => el("span", { class: `status st-${status}`, text: status });

  function setLive(kind, text) {
    $("live").className = `live ${kind}`;
    $("live").textContent = text;
  }
  function showBanner(text) {
    $("banner").hidden = !text;
    $("banner").textContent = text || "";
  }

  // Asks before an action that changes the cluster or a message.
  function confirmAction(title, text, yes, kind = "danger") {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = yes;
    $("confirm-yes").className = kind;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      $("confirm-no").focus();
    });
  }

  // ---------------------------------------------------------------- cluster ---
  let nextBatchAt = null;
  let running = null;
  let paused = false; // running, but dispatch paused: Start lifts the pause
  let inForce = null; // the schedule in force, as the last status said it

  // Why dispatch can be paused while the cluster runs (`paused.reason`).
  const PAUSES = {
    provider_auth: {
      badge: "paused: provider credentials",
      title: "Dispatch is paused: the SMS provider refuses our credentials",
      text: (since) =>
        `The SMS provider refuses our credentials (HTTP 401/403)${since ? ` since ${since}` : ""}. ` +
        "Messages wait in pending; no attempt is spent. Check SMS_API_TOKEN / SMS_API_AUTH_HEADER. " +
        "Dispatch resumes by itself when a probe send (at most one per LOCK_RETRY_INTERVAL) is accepted, " +
        "when the schedule is changed, or when the cluster is started.",
    },
    spend_cap: {
      badge: "paused: daily spend cap",
      title: "The lane reached its daily spend cap",
      text: (since) =>
        `The lane has spent its daily_spend_cap for this UTC day${since ? ` (since ${since})` : ""}. ` +
        "Messages wait in pending; no attempt is spent. It resumes at UTC midnight, or at once when the cap " +
        "is raised (PUT /api/lanes/{lane}/config {\"daily_spend_cap\": …}); resuming without a higher cap pauses it again.",
    },
  };

  // The pause notice is a role=alert: it is rewritten only when the pause changes, so
  // a screen reader announces it once, not at every refresh.
  let pauseShown = null;
  function renderPause(status) {
    const pause = status.paused
      || (status.paused_reason ? { reason: status.paused_reason, since: null, detail: null } : null);
    const key = pause ? JSON.stringify([pause.reason, pause.since, pause.detail, status.running]) : "";
    if (key === pauseShown) return pause;
    pauseShown = key;
    $("pause-notice").hidden = !pause;
    if (!pause) return pause;
    const known = PAUSES[pause.reason];
    const since = pause.since ? formatTime(pause.since) : "";
    $("pause-title").textContent = known ? known.title : `Dispatch is paused (${pause.reason})`;
    $("pause-text").textContent = (known ? known.text(since) : (since ? `Since ${since}.` : ""))
      + (status.running ? "" : " The cluster is stopped as well; starting it lifts the pause.");
    $("pause-detail").textContent = pause.detail || "";
    $("pause-detail-line").hidden = !pause.detail;
    return pause;
  }

  // An override stored in PostgreSQL shadows the environment's value: say so, with
  // who set it and when, and offer to clear it.
  const OVERRIDES = [
    { field: "batch_size", set: "batch_size_set", id: "batch-size", label: "batch size" },
    { field: "processing_interval", set: "processing_interval_set", id: "interval", label: "interval" },
  ];
  function renderOverrides(config) {
    const overrides = (config && config.overrides) || {};
    for (const o of OVERRIDES) {
      const value = overrides[o.field];
      const overridden = value !== null && value !== undefined;
      $(`${o.id}-override`).hidden = !overridden;
      $(o.id).classList.toggle("overridden", overridden);
      if (!overridden) continue;
      const set = overrides[o.set];
      const who = set ? ` by ${set.by || "an unnamed client"} at ${formatTime(set.at)}` : "";
      const configured = config.configured ? `, configured ${config.configured[o.field]}` : "";
      $(`${o.id}-mark`).textContent = `(override${who}${configured})`;
    }
  }

  function renderStatus(status) {
    running = status.running;
    const pause = renderPause(status);
    paused = Boolean(pause) && status.running;
    const badge = $("running");
    const known = pause && PAUSES[pause.reason];
    badge.textContent = (status.running ? "running" : "stopped")
      + (pause ? ` — ${known ? known.badge : `paused: ${pause.reason}`}` : "");
    badge.className = `badge ${pause ? "paused" : status.running ? "running" : "stopped"}`;
    const leader = status.leader;
    $("leader").textContent = leader
      ? leader.replica_id + (leader.alive ? "" : " (not seen recently: no live leader)")
      : "none yet";
    $("epoch").textContent = leader ? leader.epoch : "–";
    $("leader-since").textContent = leader && leader.since ? `${formatTime(leader.since)} (${ago(leader.since)})` : "–";
    nextBatchAt = status.next_batch_at ? new Date(status.next_batch_at) : null;
    $("next-batch").textContent = !status.running ? "none: the cluster is stopped"
      : paused ? "none while paused: at most one probe send per LOCK_RETRY_INTERVAL"
      : formatTime(status.next_batch_at);
    tickCountdown();
    $("batch-size").textContent = status.batch_size;
    $("interval").textContent = status.processing_interval;
    inForce = { batch_size: String(status.batch_size), processing_interval: status.processing_interval };
    renderOverrides(status.config);
    $("served-by").textContent = `served by ${status.this_replica.replica_id}`;
    $("start").disabled = controlBusy || (status.running && !paused);
    $("start").textContent = paused ? "Resume dispatch" : "Start cluster";
    $("stop").disabled = controlBusy || !status.running;

    const form = $("config-form");
    if (!configDirty && !form.contains(document.activeElement)) {
      $("config-batch-size").value = status.batch_size;
      $("config-interval").value = status.processing_interval;
    }

    const body = $("replicas").tBodies[0];
    const rows = status.replicas.map((replica) => {
      const roles = [];
      if (leader && leader.replica_id === replica.replica_id) roles.push("leader");
      else roles.push("follower");
      if (replica.replica_id === status.this_replica.replica_id) roles.push("serves this page");
      return el("tr", { "data-replica": replica.replica_id }, [
        el("td", { text: replica.replica_id }),
        el("td", { text: roles.join(", ") }),
        el("td", { text: replica.version }),
        el("td", { text: formatTime(replica.started_at) }),
        el("td", { text: ago(replica.last_seen_at) }),
      ]);
    });
    body.replaceChildren(...rows);
  }

  function tickCountdown() {
    const text = !running || paused || !nextBatchAt
      ? ""
      : (() => {
          const left = (nextBatchAt - Date.now()) / 1000;
          return left <= 0 ? "(due now)" : `(in ${formatAge(Math.ceil(left))})`;
        })();
    $("countdown").textContent = text;
  }
  setInterval(tickCountdown, 250);

  let controlBusy = false;
  async function setRunning(start) {
    const resume = start && paused;
    const ok = resume
      ? await confirmAction(
        "Resume dispatch?",
        "The pause is lifted and the leader sends again at once. If the provider still refuses "
          + "our credentials, dispatch pauses again at the first refusal; a refused message waits "
          + "in pending without spending an attempt.",
        "Resume dispatch", "ok")
      : await confirmAction(
        start ? "Start the cluster?" : "Stop the cluster?",
        start
          ? "The leader starts dispatching pending messages again, on the cluster's schedule."
          : "No new send starts anywhere in the cluster until it is started again. Sends in flight finish.",
        start ? "Start cluster" : "Stop cluster");
    if (!ok) return;
    controlBusy = true;
    $("start").disabled = $("stop").disabled = true;
    $("control-result").textContent = start ? "starting…" : "stopping… (answers once the leader can start nothing more)";
    try {
      const answer = await api("POST", start ? "messaging/start" : "messaging/stop");
      $("control-result").textContent = resume
        ? "Pause lifted: the leader tries the provider again now."
        : answer.message;
    } catch (err) {
      $("control-result").textContent = `Not done: ${err.message}`;
    } finally {
      controlBusy = false;
      refreshSoon(0);
    }
  }
  $("start").addEventListener("click", () => setRunning(true));
  $("stop").addEventListener("click", () => setRunning(false));

  let configDirty = false;
  $("config-form").addEventListener("input", () => { configDirty = true; });
  $("config-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = {
      batch_size: { input: $("config-batch-size"), error: $("config-batch-size-error") },
      processing_interval: { input: $("config-interval"), error: $("config-interval-error") },
    };
    for (const f of Object.values(fields)) {
      f.error.textContent = "";
      f.input.removeAttribute("aria-invalid");
    }
    $("config-error").textContent = "";
    $("config-result").textContent = "";
    // What was typed goes to the server as it is (a number when it is one): the API
    // decides what is valid, and its answer is shown next to the field it names. Only
    // a field that differs from the value in force is sent, so changing the batch size
    // does not pin the interval as an override too.
    const body = {};
    const unchanged = (name, value) => inForce !== null && value === inForce[name];
    const size = fields.batch_size.input.value.trim();
    if (size !== "" && !unchanged("batch_size", size)) {
      body.batch_size = /^-?\d+(\.\d+)?$/.test(size) ? Number(size) : size;
    }
    const interval = fields.processing_interval.input.value.trim();
    if (interval !== "" && !unchanged("processing_interval", interval)) body.processing_interval = interval;
    if (Object.keys(body).length === 0) {
      configDirty = false;
      $("config-result").textContent = "Nothing to apply: these values are already in force.";
      return;
    }
    try {
      const schedule = await api("PUT", "messaging/config", body);
      configDirty = false;
      $("config-result").textContent =
        `Applied: batch size ${schedule.batch_size}, interval ${schedule.processing_interval}.`;
      refreshSoon(0);
    } catch (err) {
      const target = fields[err.field];
      if (target) {
        target.error.textContent = err.message;
        target.input.setAttribute("aria-invalid", "true");
        target.input.focus();
      } else {
        $("config-error").textContent = err.message;
      }
    }
  });

  async function clearOverride(o) {
    const button = $(`${o.id}-clear`);
    button.disabled = true;
    $("config-error").textContent = "";
    $("config-result").textContent = "";
    try {
      const schedule = await api("PUT", "messaging/config", { [o.field]: null });
      $("config-result").textContent =
        `Override cleared: the ${o.label} is back to the configured ${schedule[o.field]}.`;
      // The button is about to disappear: keep the keyboard focus next to it.
      $(o.id).focus();
    } catch (err) {
      $("config-error").textContent = `The ${o.label} override was not cleared: ${err.message}`;
    } finally {
      button.disabled = false;
      refreshSoon(0);
    }
  }
  for (const o of OVERRIDES) $(`${o.id}-clear`).addEventListener("click", () => clearOverride(o));

  // ------------------------------------------------------------------ lanes ---
  // One row per lane (GET /api/lanes), kept across refreshes and updated in place, so
  // a focused Stop or Start button keeps the keyboard focus while the page refreshes.
  let laneNames = [];
  const laneRows = new Map(); // name -> {row, cells, stop, start}
  const laneBusy = new Set(); // lanes with a stop or start in flight
  const laneState = new Map(); // name -> {running, paused} as last shown

  // Per second, to the precision that matters: 1200, 2.0, 0.033 (2 per minute), 0.0.
  const rate = (n) => (n >= 100 ? n.toFixed(0) : n >= 1 || n === 0 ? n.toFixed(1) : n.toPrecision(2));
  // "2.0 / 1.9 per s", wrapping only at the slash. The configured rate counts the
  // lane's unit; the achieved one is the messages sent in the last minute over 60 s,
  // so a segments lane names both units.
  function rateCell(lane) {
    const configured = lane.configured_rate_per_second === null ? "unlimited" : rate(lane.configured_rate_per_second);
    const achieved = rate(lane.achieved_rate_per_second);
    const segments = lane.unit === "segments";
    return el("span", { class: "lane-rate-value" }, [
      el("span", { class: "nowrap", text: segments && configured !== "unlimited" ? `${configured} segments` : configured }),
      " / ",
      el("span", { class: "nowrap", text: segments ? `${achieved} messages per s` : `${achieved} per s` }),
    ]);
  }

  // A line of facts, "a · b", that wraps between facts but never inside one
  // ("replica-1", "2 pending"); a fact given as an array of parts may also wrap
  // between its parts ("3 messages" "every 1s").
  const facts = (cls, ...items) => el("span", { class: cls },
    items.flatMap((item, i) => [
      ...(i ? ["\u00a0· "] : []),
      ...[].concat(item).flatMap((text, j) => [...(j ? [" "] : []), el("span", { class: "nowrap", text })]),
    ]));

  function laneRow(name) {
    const cells = {};
    for (const key of ["name", "leader", "state", "rate", "queue", "providers", "actions"]) {
      cells[key] = el("td", { class: `lane-${key}` });
    }
    const stop = el("button", { type: "button", class: "danger small lane-stop", text: "Stop", "aria-label": `Stop lane ${name}` });
    const start = el("button", { type: "button", class: "ok small lane-start", text: "Start", "aria-label": `Start lane ${name}` });
    stop.addEventListener("click", () => setLaneRunning(name, false));
    start.addEventListener("click", () => setLaneRunning(name, true));
    cells.actions.append(el("div", { class: "buttons" }, [stop, start]));
    cells.name.append(el("strong", { text: name }));
    const row = el("tr", { "data-lane": name }, Object.values(cells));
    return { row, cells, stop, start };
  }

  // An amount in the prices' currency: two decimals, more when a price needs them.
  function money(amount) {
    const text = Number(amount || 0).toFixed(6).replace(/0+$/, "");
    const [whole, fraction = ""] = text.split(".");
    return `${whole}.${fraction.padEnd(2, "0")}`;
  }

  function renderLanes(answer) {
    const lanes = answer.lanes || [];
    const names = lanes.map((lane) => lane.name);
    if (JSON.stringify(names) !== JSON.stringify(laneNames)) {
      laneNames = names;
      laneRows.clear();
      for (const name of names) laneRows.set(name, laneRow(name));
      const body = $("lanes").tBodies[0];
      body.replaceChildren(...[...laneRows.values()].map((r) => r.row));
      if (names.length === 0) {
        body.append(el("tr", {}, [el("td", { colSpan: 7, class: "muted", text: "No lanes configured." })]));
      }
      renderLaneFilter(names);
    }
    for (const lane of lanes) {
      const { row, cells, stop, start } = laneRows.get(lane.name);
      const leader = lane.leader;
      row.dataset.running = String(lane.running);
      row.dataset.leader = leader ? leader.replica_id : "";
      row.dataset.paused = lane.paused_reason || "";
      // The spread's choice, when the lane is not (yet) with it: a handover is due.
      const assigned = lane.assigned_to && (!leader || leader.replica_id !== lane.assigned_to)
        ? [el("span", { class: "sub muted" }, ["assigned to ", el("span", { class: "nowrap", text: lane.assigned_to })])] : [];
      // How long it has led is in the cluster panel too: only on wide screens here.
      const since = leader && leader.since ? [el("span", { class: "wide-only" }, ["\u00a0· ", el("span", { class: "nowrap", text: `since ${ago(leader.since)}` })])] : [];
      cells.leader.replaceChildren(...(leader
        ? [facts("", leader.replica_id), el("span", { class: "sub muted" }, [el("span", { class: "nowrap", text: `epoch ${leader.epoch}` }), ...since])]
        : [el("span", { class: "badge stopped no-leader", text: "no leader" })]), ...assigned);

      const paused = Boolean(lane.paused_reason) && lane.running;
      const known = lane.paused_reason && PAUSES[lane.paused_reason];
      const badge = el("span", {
        class: `badge ${paused ? "paused" : lane.running ? "running" : "stopped"}`,
        text: lane.running ? "running" : "stopped",
      });
      // The day's spend against the cap, for a lane with one.
      const spend = typeof lane.daily_spend_cap === "number"
        ? [facts("sub muted lane-spend", [`spent ${money(lane.spend_today)}`, `of ${money(lane.daily_spend_cap)}`, "today (UTC)"])] : [];
      cells.state.replaceChildren(badge, ...(lane.paused_reason
        ? [el("span", { class: "sub lane-paused", text: known ? known.badge : `paused: ${lane.paused_reason}` })]
        : []), ...spend);

      const unit = lane.unit === "segments" ? "segments" : lane.batch_size === 1 ? "message" : "messages";
      // Throttled by a provider: the leader sends below the configured rate for a while.
      const slowed = typeof lane.rate_factor === "number" && lane.rate_factor < 1 && lane.effective_rate_per_second !== null
        ? [facts("sub lane-slowed", `slowed to ${rate(lane.effective_rate_per_second)} per s by throttling`)] : [];
      cells.rate.replaceChildren(
        rateCell(lane),
        ...slowed,
        facts("sub muted", [`${lane.batch_size} ${unit}`, `every ${lane.interval}`], `${lane.send_concurrency} in flight`));
      cells.queue.replaceChildren(
        facts("", `${count(lane.pending)} pending`),
        facts("sub muted", `${count(lane.sending)} sending`),
        facts("sub muted wide-only", `${count(lane.sent_last_minute)} sent last min`));
      cells.providers.replaceChildren(...(lane.providers.length === 0
        ? [el("span", { class: "muted", text: "none" })]
        : lane.providers.map((p) => el("span", { class: "provider", "data-provider": p.name, title: p.kind }, [
          el("span", { class: "nowrap", text: p.name }), " ",
          el("span", { class: `breaker breaker-${p.state}`, text: p.state, title: p.open_until ? `open until ${p.open_until}` : "" }),
          ...(p.throttled_until ? [" ", el("span", { class: "breaker breaker-throttled", text: "throttled", title: `until ${p.throttled_until}` })] : []),
        ]))));

      laneState.set(lane.name, { running: lane.running, paused });
      const busy = laneBusy.has(lane.name);
      stop.disabled = busy || !lane.running;
      start.disabled = busy || (lane.running && !paused);
      start.textContent = paused ? "Resume" : "Start";
      start.setAttribute("aria-label", `${paused ? "Resume" : "Start"} lane ${lane.name}`);
    }
  }

  async function setLaneRunning(name, start) {
    const resume = start && laneState.get(name) && laneState.get(name).paused;
    const ok = await confirmAction(
      resume ? `Resume lane ${name}?` : start ? `Start lane ${name}?` : `Stop lane ${name}?`,
      resume
        ? `The pause of lane ${name} is lifted and its leader sends again at once.`
        : start
          ? `The leader of lane ${name} starts dispatching its pending messages again, on the lane's schedule.`
          : `No new send starts in lane ${name} until it is started again; sends in flight finish. Other lanes go on.`,
      resume ? `Resume lane ${name}` : start ? `Start lane ${name}` : `Stop lane ${name}`,
      start ? "ok" : "danger");
    if (!ok) return;
    laneBusy.add(name);
    const row = laneRows.get(name);
    if (row) row.stop.disabled = row.start.disabled = true;
    $("lanes-result").textContent = start
      ? `starting lane ${name}…`
      : `stopping lane ${name}… (answers once its leader can start nothing more)`;
    try {
      const answer = await api("POST", `lanes/${encodeURIComponent(name)}/${start ? "start" : "stop"}`);
      $("lanes-result").textContent = resume ? `Lane ${answer.lane}: pause lifted.`
        : answer.status === "started" ? `Lane ${answer.lane} started.`
        : answer.status === "running" ? `Lane ${answer.lane} was already running.`
        : answer.changed ? `Lane ${answer.lane} stopped: no new send starts in it.`
        : `Lane ${answer.lane} was already stopped.`;
    } catch (err) {
      $("lanes-result").textContent = `Lane ${name}: not done: ${err.message}`;
    } finally {
      laneBusy.delete(name);
      refreshSoon(0);
    }
  }

  // The lane filter's choices are the configured lanes; a choice that is gone falls
  // back to any lane.
  function renderLaneFilter(names) {
    const select = $("filter-lane");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", text: "any" }),
      ...names.map((name) => el("option", { value: name, text: name })));
    select.value = names.includes(chosen) ? chosen : "";
    if (select.value !== chosen) select.dispatchEvent(new Event("change"));
  }

  // ------------------------------------------------------------------ queue ---
  function renderStats(stats) {
    const counts = STATUSES.map((status) =>
      el("div", { class: "count", "data-status": status }, [
        el("div", { class: "n", text: String(stats.by_status[status] ?? 0) }),
        el("div", { class: "label", text: status }),
      ]));
    $("counts").replaceChildren(...counts);
    $("oldest-pending").textContent = stats.oldest_pending_age_seconds === null
      ? "none pending" : formatAge(stats.oldest_pending_age_seconds);
    // Priorities are served strictly in order (3 first): when several wait, a higher
    // one above the rate starves the lower ones, and their ages show it.
    const ages = stats.oldest_pending_age_seconds_by_priority || {};
    const waiting = Object.keys(ages).filter((p) => ages[p] !== null).sort((a, b) => b - a);
    const byPriority = waiting.length > 1;
    $("oldest-by-priority").hidden = $("oldest-by-priority-label").hidden = !byPriority;
    $("oldest-by-priority").textContent = byPriority
      ? `${waiting.map((p) => `priority ${p}: ${formatAge(ages[p])}`).join(" · ")} (served highest first)`
      : "–";
    $("scheduled").textContent = stats.scheduled;
    $("sent-minute").textContent = stats.sent_last_minute;
    $("sent-hour").textContent = stats.sent_last_hour;
    const d = stats.delivery;
    $("delivery").textContent =
      `${d.delivered} delivered · ${d.undelivered} undelivered · ${d.failed} failed · ${d.awaiting} awaiting`;
  }

  let chart = null;
  function chartWidth() {
    return Math.max(280, $("chart").clientWidth);
  }
  function renderActivity(activity) {
    // The API lists only seconds with activity; the chart shows every second.
    const from = Math.floor(new Date(activity.from) / 1000) + 1;
    const until = Math.floor(new Date(activity.until) / 1000);
    const n = Math.max(0, until - from + 1);
    const x = new Array(n), sent = new Array(n).fill(0), failed = new Array(n).fill(0), retried = new Array(n).fill(0);
    for (let i = 0; i < n; i++) x[i] = from + i;
    const totals = { sent: 0, failed: 0, retried: 0 };
    for (const s of activity.seconds) {
      const i = Math.floor(new Date(s.at) / 1000) - from;
      if (i < 0 || i >= n) continue;
      sent[i] += s.sent; failed[i] += s.failed; retried[i] += s.retried;
      totals.sent += s.sent; totals.failed += s.failed; totals.retried += s.retried;
    }
    $("chart-summary").textContent =
      `Last ${CHART_MINUTES} minutes, whole cluster: ${totals.sent} sent, ${totals.failed} failed, ${totals.retried} retried.`;
    const data = [x, sent, failed, retried];
    if (typeof uPlot === "undefined") return;
    if (chart) {
      chart.setData(data);
      return;
    }
    chart = new uPlot({
      width: chartWidth(),
      height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
      series: [
        { label: "time (UTC)" },
        { label: "sent/s", stroke: "#0a6b2c", width: 1.5, fill: "rgba(10,107,44,.08)" },
        { label: "failed/s", stroke: "#b3261e", width: 1.5 },
        { label: "retried/s", stroke: "#8a4b00", width: 1.5, dash: [6, 3] },
      ],
      axes: [
        { values: (u, splits) => splits.map((ts) => formatTime(new Date(ts * 1000).toISOString()).slice(11, 16)) },
        { label: "per second", size: 50 },
      ],
    }, data, $("chart"));
    new ResizeObserver(() => chart.setSize({ width: chartWidth(), height: 220 })).observe($("chart"));
  }

  // --------------------------------------------------------------- messages ---
  const view = { status: "", lane: "", phone: "", id: null, cursor: null, older: [], nextCursor: null };
  let selected = null;

  function listPath() {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (view.status) params.set("status", view.status);
    if (view.lane) params.set("lane", view.lane);
    if (view.phone) params.set("phone_number", view.phone);
    if (view.cursor) params.set("cursor", String(view.cursor));
    return `messages?${params}`;
  }

  // The filter a list answer was asked for: an answer to an older filter is not shown
  // (the refresh that the new filter asked for follows at once), so the table and the
  // bulk action's count always belong to the filter on screen.
  const viewKey = () => JSON.stringify([view.status, view.lane, view.phone, view.id, view.cursor]);

  async function loadMessages() {
    const asked = viewKey();
    const current = () => asked === viewKey();
    if (view.id !== null) {
      try {
        const message = await api("GET", `messages/${view.id}`);
        if (current()) renderMessages({ messages: [message], total: 1, next_cursor: null });
      } catch (err) {
        if (err.status !== 404) throw err;
        if (current()) renderMessages({ messages: [], total: 0, next_cursor: null }, `No message ${view.id}.`);
      }
      return;
    }
    try {
      const page = await api("GET", listPath());
      if (!current()) return;
      renderMessages(page);
      $("filter-error").textContent = "";
    } catch (err) {
      if (!current()) return;
      if (err.status === 400) {
        $("filter-error").textContent = err.message;
        renderMessages({ messages: [], total: 0, next_cursor: null }, "No results: see the error above.");
        return;
      }
      throw err;
    }
  }

  // What the console shows for a finished message whose text CONTENT_RETENTION removed.
  const REMOVED_TEXT = "(text removed after CONTENT_RETENTION)";
  function renderMessages(page, empty) {
    const rows = page.messages.map((m) => {
      const open = el("button", { type: "button", class: "id-button", text: String(m.id), "aria-label": `Message ${m.id}: details` });
      open.addEventListener("click", () => openDetail(m.id));
      const text = m.content ?? REMOVED_TEXT;
      const content = text.length > 80 ? `${text.slice(0, 80)}…` : text;
      return el("tr", { "data-id": String(m.id), "data-status": m.status, "data-lane": m.lane || "", class: selected === m.id ? "selected" : "" }, [
        el("td", {}, [open]),
        el("td", {}, [statusBadge(m.status)]),
        el("td", { class: "lane", text: m.lane || "–" }),
        el("td", { text: m.phone_number }),
        el("td", { class: "content", text: content }),
        el("td", { text: String(m.attempts) }),
        el("td", { text: formatTime(m.created_at) }),
        el("td", { class: "wide-only", text: formatTime(m.sent_at) }),
        el("td", { class: "wide-only delivery", "data-delivery": m.delivery_status || "", text: m.delivery_status || "–" }),
      ]);
    });
    if (rows.length === 0) {
      rows.push(el("tr", {}, [el("td", { colSpan: 9, class: "muted", text: empty || "No messages match." })]));
    }
    $("messages").tBodies[0].replaceChildren(...rows);
    view.nextCursor = page.next_cursor;
    $("page-older").disabled = !page.next_cursor;
    $("page-first").disabled = view.cursor === null;
    const pageNo = view.older.length + 1;
    $("page-info").textContent = view.id !== null
      ? `message ${view.id}`
      : `page ${pageNo} · ${totalText(page.total, page.total_exact)} matching`;
    renderBulk(page.total, page.total_exact);
  }

  // ------------------------------------------------------------ bulk actions ---
  // "Retry all N failed" / "Cancel all N pending" for the filter on screen (status, the
  // lane when one is chosen, and the phone number when the search is one; never for a
  // search by id). N is the list's total; the server applies the same filter when the
  // operator confirms.
  const BULK = {
    failed: {
      path: "messages/retry", answer: "retried", verb: "Retry", kind: "ok",
      explain: "They go back to pending with their attempts reset and are sent on the cluster's schedule.",
      done: (n, noun, to) => `Retried ${n} failed ${noun}${to}: pending again, sent on the cluster's schedule.`,
    },
    pending: {
      path: "messages/cancel", answer: "cancelled", verb: "Cancel", kind: "danger",
      explain: "They will never be sent. This cannot be undone.",
      done: (n, noun, to) => `Cancelled ${n} pending ${noun}${to}: they will never be sent.`,
    },
  };
  let bulkOffer = null; // what the button offers: {status, lane, phone, total}
  let bulkBusy = false;
  const count = (n) => n.toLocaleString("en-US");
  // A page's total is counted up to a bound unless asked for exactly: "10,000+".
  const totalText = (n, exact) => `${count(n)}${exact === false ? "+" : ""}`;
  const messagesNoun = (n) => (n === 1 ? "message" : "messages");
  // " to +90555… in lane otp": the part of the filter beyond the status.
  const bulkScope = (offer) => (offer.phone ? ` to ${offer.phone}` : "") + (offer.lane ? ` in lane ${offer.lane}` : "");

  function renderBulk(total, exact) {
    const action = view.id === null ? BULK[view.status] : undefined;
    const button = $("bulk-action");
    bulkOffer = action && total > 0 ? { status: view.status, lane: view.lane, phone: view.phone, total, exact } : null;
    button.hidden = !bulkOffer;
    if (!bulkOffer) return;
    const to = bulkScope(bulkOffer);
    button.textContent = `${action.verb} all ${totalText(total, exact)} ${view.status}${to}`;
    button.className = action.kind;
    button.disabled = bulkBusy;
  }

  $("bulk-action").addEventListener("click", async () => {
    const offer = bulkOffer;
    if (!offer || bulkBusy) return;
    const action = BULK[offer.status];
    const noun = messagesNoun(offer.total);
    const to = bulkScope(offer);
    const ok = await confirmAction(
      `${action.verb} ${totalText(offer.total, offer.exact)} ${offer.status} ${noun}${to}?`,
      `${action.explain} The filter is applied when you confirm: a message that became ${offer.status} since this count is included.`,
      `${action.verb} ${totalText(offer.total, offer.exact)} ${noun}`,
      action.kind);
    if (!ok) return;
    bulkBusy = true;
    $("bulk-action").disabled = true;
    $("bulk-result").textContent = `${action.verb === "Retry" ? "Retrying" : "Cancelling"} ${totalText(offer.total, offer.exact)} ${noun}…`;
    try {
      const body = { status: offer.status };
      if (offer.phone) body.phone_number = offer.phone;
      if (offer.lane) body.lane = offer.lane;
      const answer = await api("POST", action.path, body);
      const n = answer[action.answer];
      $("bulk-result").textContent = action.done(count(n), messagesNoun(n), to);
    } catch (err) {
      $("bulk-result").textContent = `Not done: ${err.message}`;
    } finally {
      bulkBusy = false;
      // The button goes once nothing is left to act on: keep the focus on the answer.
      $("bulk-result").focus();
      refreshSoon(0);
    }
  });

  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const search = $("filter-search").value.trim();
    view.status = $("filter-status").value;
    view.lane = $("filter-lane").value;
    view.cursor = null;
    view.older = [];
    view.id = null;
    view.phone = "";
    // An id is short digits; anything else is a phone number, checked by the API.
    if (/^\d{1,9}$/.test(search)) view.id = Number(search);
    else view.phone = search;
    $("filter-error").textContent = "";
    $("bulk-result").textContent = "";
    refreshSoon(0);
  });
  $("filter-status").addEventListener("change", () => $("filter-form").requestSubmit());
  $("filter-lane").addEventListener("change", () => $("filter-form").requestSubmit());
  $("filter-clear").addEventListener("click", () => {
    $("filter-search").value = "";
    $("filter-status").value = "";
    $("filter-lane").value = "";
    $("filter-form").requestSubmit();
  });
  $("page-older").addEventListener("click", () => {
    if (!view.nextCursor) return;
    view.older.push(view.cursor);
    view.cursor = view.nextCursor;
    refreshSoon(0);
  });
  $("page-first").addEventListener("click", () => {
    view.cursor = null;
    view.older = [];
    refreshSoon(0);
  });

  // ----------------------------------------------------------------- detail ---
  const DETAIL_FIELDS = [
    ["status", "Status"], ["lane", "Lane"], ["phone_number", "Phone number"], ["content", "Content"],
    ["attempts", "Attempts"], ["last_error", "Last error"], ["message_id", "Provider id"],
    ["priority", "Priority"], ["encoding", "Encoding"], ["segments", "Segments"],
    ["created_at", "Created"], ["send_at", "Send at"], ["next_attempt_at", "Next attempt"],
    ["expires_at", "Expires at"], ["sent_at", "Sent"], ["cached_at", "Cached (Redis)"],
    ["delivery_status", "Delivery status"], ["delivered_at", "Delivered"],
    ["delivery_error", "Delivery error"], ["idempotency_key", "Idempotency key"],
  ];

  async function openDetail(id) {
    selected = id;
    $("detail-result").textContent = "";
    $("detail").hidden = false;
    await loadDetail();
    $("detail").focus();
  }

  async function loadDetail() {
    if (selected === null) return;
    const m = await api("GET", `messages/${selected}`);
    $("detail-title").textContent = `Message ${m.id}`;
    const items = [];
    for (const [key, label] of DETAIL_FIELDS) {
      let value = m[key];
      if (key === "content" && value === null) value = REMOVED_TEXT;
      else if (key.endsWith("_at")) value = value ? formatTime(value) : "–";
      else if (value === null || value === undefined || value === "") value = "–";
      const dd = key === "status" ? el("dd", { "data-field": key }, [statusBadge(m.status)]) : el("dd", { "data-field": key, text: String(value) });
      items.push(el("dt", { text: label }), dd);
    }
    $("detail-fields").replaceChildren(...items);
    $("detail").dataset.status = m.status;
    $("detail-retry").hidden = m.status !== "failed";
    $("detail-cancel").hidden = m.status !== "pending";
    for (const row of $("messages").tBodies[0].rows) {
      row.classList.toggle("selected", row.dataset.id === String(m.id));
    }
  }

  async function messageAction(action) {
    const id = selected;
    if (action === "cancel") {
      const ok = await confirmAction(`Cancel message ${id}?`, "It will never be sent. This cannot be undone.", "Cancel message");
      if (!ok) return;
    }
    try {
      const m = await api("POST", `messages/${id}/${action}`);
      $("detail-result").textContent = action === "retry"
        ? `Message ${m.id} is ${m.status} again and will be sent on the cluster's schedule.`
        : `Message ${m.id} is ${m.status}.`;
    } catch (err) {
      $("detail-result").textContent = `Not done: ${err.message}`;
    }
    refreshSoon(0);
  }
  $("detail-retry").addEventListener("click", () => messageAction("retry"));
  $("detail-cancel").addEventListener("click", () => messageAction("cancel"));
  $("detail-close").addEventListener("click", () => {
    selected = null;
    $("detail").hidden = true;
    for (const row of $("messages").tBodies[0].rows) row.classList.remove("selected");
  });

  // --------------------------------------------------------------- webhooks ---
  // Dead letters: the panel shows while there are some, or a replay's result to read.
  function renderWebhooks(page) {
    const events = (page && page.events) || [];
    $("webhooks-panel").hidden = events.length === 0 && !$("webhooks-result").textContent;
    if (events.length === 0) {
      $("webhooks").tBodies[0].replaceChildren(
        el("tr", {}, [el("td", { colSpan: 6, class: "muted", text: "None left." })]));
      return;
    }
    $("webhooks").tBodies[0].replaceChildren(...events.map((event) => {
      const replay = el("button", {
        type: "button", class: "ok", text: "Replay",
        "aria-label": `Replay ${event.type} of message ${event.message_id}`,
      });
      replay.addEventListener("click", () => replayWebhook(event));
      return el("tr", { "data-event": String(event.id) }, [
        el("td", {}, [el("span", { class: "nowrap", text: event.type }),
          el("span", { class: "sub muted", text: event.webhook_id })]),
        el("td", { text: String(event.message_id) }),
        el("td", { text: String(event.attempts) }),
        el("td", { text: event.last_error || "–" }),
        el("td", { class: "nowrap", text: formatTime(event.created_at) }),
        el("td", {}, [replay]),
      ]);
    }));
  }

  async function replayWebhook(event) {
    const ok = await confirmAction(
      `Replay ${event.type}?`,
      `The event about message ${event.message_id} is posted again now, with the same webhook-id ${event.webhook_id}, and retried for STATUS_WEBHOOK_RETRY_FOR if it is refused again.`,
      "Replay", "ok");
    if (!ok) return;
    try {
      await api("POST", `webhooks/${event.id}/replay`);
      $("webhooks-result").textContent = `${event.type} of message ${event.message_id}: posted again.`;
    } catch (err) {
      $("webhooks-result").textContent = `Not replayed: ${err.message}`;
    } finally {
      refreshSoon(0);
    }
  }

  // ---------------------------------------------------------------- refresh ---
  let timer = null;
  let refreshing = false;
  let again = false;

  async function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      const results = await Promise.allSettled([
        api("GET", "messaging/status").then(renderStatus),
        api("GET", "lanes").then(renderLanes),
        api("GET", "messages/stats").then(renderStats),
        api("GET", `messages/activity?minutes=${CHART_MINUTES}`).then(renderActivity),
        api("GET", "webhooks/failed?limit=20").then(renderWebhooks),
        loadMessages(),
        loadDetail(),
      ]);
      const failure = results.find((r) => r.status === "rejected");
      if (waitingForToken) {
        showBanner("");
      } else if (failure) {
        const err = failure.reason;
        setLive("bad", "not updating");
        showBanner(err.status === 0
          ? "This replica cannot be reached; the view is stale. Retrying every 2 s."
          : `The API answered an error: ${err.message}`);
      } else {
        showBanner("");
        setLive("ok", `live · updated ${formatTime(new Date().toISOString()).slice(11)}`);
      }
    } finally {
      refreshing = false;
    }
    if (again) {
      again = false;
      refreshSoon(0);
    } else {
      refreshSoon(REFRESH_MS);
    }
  }

  function refreshSoon(delay) {
    clearTimeout(timer);
    if (waitingForToken && delay !== 0) return;
    timer = setTimeout(refresh, delay);
  }

  refreshSoon(0);
})();

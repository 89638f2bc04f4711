// The status panel: model state, idle unload countdown, queue, running jobs, recent batches. Live.

import { apiJson } from "./api.js";
import { $, clear, make, seconds, setText } from "./dom.js";

const EVERY_MS = 1000;
let active = false;

function idleText(status) {
  if (status.state !== "ready" && status.state !== "offloaded") return "not loaded";
  const where = status.state === "offloaded" ? "offloaded to host memory; " : "";
  if (status.idle_unload_in == null) return where + (status.queue_depth || status.jobs_running ? "busy" : "never");
  return `${where}in ${Math.ceil(status.idle_unload_in)} s`;
}

function keepAliveText(status) {
  if (status.keep_alive == null) return "–";
  const seconds = status.keep_alive < 0 ? "until unloaded by hand" : `${status.keep_alive} s`;
  return status.keep_alive_from ? `${seconds} (set by the ${status.keep_alive_from})` : seconds;
}

function draw(status) {
  setText($("st-model"), status.model);
  setText($("st-state"), status.draining ? `${status.state} (draining)` : status.state);
  setText($("st-device"), status.device ? `${status.device} ${status.dtype || ""}` : "–");
  setText($("st-idle"), idleText(status));
  setText($("st-keep-alive"), keepAliveText(status));
  const lanes = status.lane_depths || {};
  const split = Object.keys(lanes).length ? ` (${Object.entries(lanes).map(([lane, n]) => `${lane} ${n}`).join(", ")})` : "";
  setText($("st-queue"), `${status.queue_depth}${split}`);
  setText($("st-running"), status.jobs_running);
  setText($("st-batches"), status.batches_run);
  setText($("st-jobs"), status.jobs_done);
  setText($("st-speed"), status.images_per_second == null ? "–" : `${status.images_per_second} img/s`);
  setText($("st-error"), status.last_error || "none");
  // Which model, in the header of every tab: "model unloaded" left a newcomer guessing which one.
  setText($("status-line"), `${status.model} ${status.state} · queue ${status.queue_depth} · running ${status.jobs_running}`);
  const body = $("batches");
  clear(body);
  for (const batch of [...status.recent_batches].reverse()) {
    const row = make("tr");
    row.appendChild(make("td", null, new Date(batch.finished_at * 1000).toLocaleTimeString()));
    row.appendChild(make("td", null, batch.size));
    row.appendChild(make("td", null, seconds(batch.seconds)));
    row.appendChild(make("td", null, batch.images_per_second));
    body.appendChild(row);
  }
}

async function poll() {
  try {
    draw(await apiJson("/ui/api/status"));
  } catch (error) {
    setText($("status-line"), `status unavailable: ${error.message}`);
    if (error.status === 401) {
      active = false; // the page asks for the key and starts again
      return;
    }
  }
  setTimeout(poll, document.hidden ? EVERY_MS * 5 : EVERY_MS);
}

export function startStatus() {
  if (active) return;
  active = true;
  poll();
}

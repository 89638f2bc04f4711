// Try it: drop, paste or pick an image, choose a model (when the server has several) and a task,
// see the caption, its time and queue wait.

import { api } from "./api.js";
import { $, clear, fillTasks, make, seconds, setText, show } from "./dom.js";

let current = null; // the File being captioned
let previewUrl = null;
let started = false;
let models = []; // [{name, source, tasks, default_task}] from /ui/api/info
let shown = null; // the /ui/api/info the page was drawn from

function fillModels(info) {
  models = info.models || [];
  const select = $("model");
  const kept = select.value;
  clear(select);
  for (const { name, source } of models) {
    const option = make("option", null, name);
    option.value = name;
    if (source && source !== name) option.title = source;
    option.selected = kept ? name === kept : name === info.default_model;
    select.appendChild(option);
  }
  show($("model-choice"), models.length > 1);
}

function fillTasksOfModel(info) {
  const model = models.find(({ name }) => name === $("model").value);
  const kept = $("task").value;
  const tasks = model ? model.tasks : info.tasks;
  const chosen = tasks.some(({ task }) => task === kept) ? kept : model ? model.default_task : info.default_task;
  fillTasks($("task"), tasks, chosen);
}

function choose(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setText($("try-error"), `${file.name} is not an image (${file.type}).`);
    return;
  }
  current = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  show($("preview"), true);
  $("run").disabled = false;
  run();
}

async function run() {
  if (!current) return;
  const form = new FormData();
  form.append("image", current, current.name || "pasted.png");
  form.append("task", $("task").value);
  if (models.length > 1) form.append("model", $("model").value);
  $("run").disabled = true;
  setText($("try-error"), "");
  setText($("try-caption"), "");
  setText($("try-timing"), "captioning…");
  document.body.dataset.tryState = "running";
  try {
    const reply = await (await api("/ui/api/caption", { method: "POST", body: form })).json();
    setText($("try-caption"), reply.caption);
    const batch = reply.batch_size ? `, batch of ${reply.batch_size}` : "";
    const by = models.length > 1 ? `${reply.model}: ` : "";
    setText($("try-timing"), `${by}${reply.task} in ${seconds(reply.seconds)} (queue wait ${seconds(reply.queue_wait)}${batch})`);
    document.body.dataset.tryState = "done";
  } catch (error) {
    setText($("try-timing"), "");
    setText($("try-error"), error.message);
    document.body.dataset.tryState = "failed";
  } finally {
    $("run").disabled = false;
  }
}

export function startTry(info) {
  shown = info;
  fillModels(info);
  fillTasksOfModel(info);
  if (started) return;
  started = true;
  const drop = $("drop");
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    if (document.body.dataset.page !== "try") return;
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) choose(file);
  });
  $("run").addEventListener("click", run);
  $("task").addEventListener("change", run);
  $("model").addEventListener("change", () => {
    fillTasksOfModel(shown);
    run();
  });
}

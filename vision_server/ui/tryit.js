// Try it: drop, paste or pick an image, choose a model (when the server has several) and a task,
// see the caption, its time and queue wait.

import { api } from "./api.js";
import { $, announce, fillModels, fillTasksOf, pickedModel, seconds, setText, show } from "./dom.js";

let current = null; // the File being captioned
let previewUrl = null;
let started = false;
let shown = null; // the /ui/api/info the page was drawn from

// While a caption runs, "Caption again" says it is unavailable (aria-disabled) instead of being
// disabled: a disabled button loses focus, and a keyboard user who pressed it landed at the top.
function busy(running) {
  $("run").setAttribute("aria-disabled", String(running));
}

function choose(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    announce($("try-error"), `${file.name} is not an image (${file.type}).`);
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
  const model = pickedModel($("model"), shown);
  if (model) form.append("model", model);
  busy(true);
  announce($("try-error"), "");
  setText($("try-caption"), "");
  setText($("try-timing"), "captioning…");
  document.body.dataset.tryState = "running";
  try {
    const reply = await (await api("/ui/api/caption", { method: "POST", body: form })).json();
    setText($("try-caption"), reply.caption);
    const batch = reply.batch_size ? `, batch of ${reply.batch_size}` : "";
    const by = model ? `${reply.model}: ` : "";
    setText($("try-timing"), `${by}${reply.task} in ${seconds(reply.seconds)} (queue wait ${seconds(reply.queue_wait)}${batch})`);
    document.body.dataset.tryState = "done";
  } catch (error) {
    setText($("try-timing"), "");
    announce($("try-error"), error.message);
    document.body.dataset.tryState = "failed";
  } finally {
    busy(false);
  }
}

export function startTry(info) {
  shown = info;
  fillModels($("model"), $("model-choice"), info);
  fillTasksOf($("task"), $("model"), info);
  if (started) return;
  started = true;
  const drop = $("drop");
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  // Space opens the file chooser (the browser's own); Enter does too, as on any other button.
  $("file").addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault();
    $("file").click();
  });
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
  $("run").addEventListener("click", () => {
    if ($("run").getAttribute("aria-disabled") !== "true") run();
  });
  $("task").addEventListener("change", run);
  $("model").addEventListener("change", () => {
    fillTasksOf($("task"), $("model"), shown);
    run();
  });
}

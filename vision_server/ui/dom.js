// Small DOM helpers. Text from the server (captions, file names) only ever goes in as text.

export const $ = (id) => document.getElementById(id);

export function setText(element, text) {
  element.textContent = text == null ? "" : String(text);
}

export function show(element, visible = true) {
  element.hidden = !visible;
}

// A live region (an alert, or the gallery's echo of its cards' messages) is emptied at once and
// its text put in only once the page has been drawn without it: a message repeated word for word
// (the same save failing twice) is then new text to the accessibility tree and read out again,
// not taken for no change. What each box says or is about to say is kept here, so a newer
// message, or emptying it, replaces one on its way.
const ANNOUNCE_DELAY_MS = 100;
const said = new WeakMap(); // live region -> { text }

// A live region belongs to the view (tab panel) it is in. In a hidden view nobody hears it, and
// once the view is shown again a screen reader reads out an alert that appears with it as if new:
// a burst of old errors. So in a hidden view an alert that says something is plain text (the
// view's state, seen and readable when the user comes back, not announced; an empty one stays an
// alert, as it reads out nothing) and an echo (class "echo": a hidden copy of what the view shows
// elsewhere) is empty. The alert is an alert again with its next message.
function inHiddenView(box) {
  return Boolean(box.closest("[role=tabpanel][hidden]"));
}

function quiet(box) {
  if (box.classList.contains("echo")) {
    said.delete(box);
    setText(box, "");
    return;
  }
  if (announced(box)) {
    box.removeAttribute("role");
    box.dataset.quietAlert = "";
  } else if ("quietAlert" in box.dataset) {
    delete box.dataset.quietAlert; // nothing to say: an empty alert, shown, reads out nothing
    box.setAttribute("role", "alert");
  }
}

// Called for a view being hidden: its live regions go quiet (see above).
export function quietView(panel) {
  for (const box of panel.querySelectorAll("[role=alert], [data-quiet-alert], .echo")) quiet(box);
}

export function announce(box, text) {
  const wanted = { text: text == null ? "" : String(text) };
  said.set(box, wanted);
  if (inHiddenView(box)) {
    setText(box, wanted.text);
    quiet(box);
    return;
  }
  setText(box, "");
  if ("quietAlert" in box.dataset) {
    delete box.dataset.quietAlert;
    box.setAttribute("role", "alert"); // empty: its text comes as a change, and is read out
  }
  if (!wanted.text) return;
  requestAnimationFrame(() => {
    setTimeout(() => {
      if (said.get(box) !== wanted) return;
      if (inHiddenView(box)) quiet(box); // hidden in the meantime
      if (said.get(box) === wanted) setText(box, wanted.text);
    }, ANNOUNCE_DELAY_MS);
  });
}

// What a live region says, or is about to say.
export function announced(box) {
  return said.has(box) ? said.get(box).text : box.textContent;
}

// A message in one of two live regions: progress and results in a polite one (role=status, read
// when the reader is free), an error that stopped what the user asked for in an alert (read at
// once). The other is emptied, so an old error does not stay beside new progress.
export function tell(politeBox, alertBox, text, isError = false) {
  setText(politeBox, isError ? "" : text);
  announce(alertBox, isError ? text : "");
}

export function clear(element) {
  while (element.firstChild) element.removeChild(element.firstChild);
}

export function make(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text != null) element.textContent = String(text);
  return element;
}

export function fillTasks(select, tasks, chosen) {
  clear(select);
  for (const { task, description } of tasks) {
    const option = make("option", null, task);
    option.value = task;
    if (description) option.title = description;
    option.selected = task === chosen;
    select.appendChild(option);
  }
}

// A model <select> (shown inside `wrapper` only when the server has several models), keeping
// the current choice when the list is redrawn.
export function fillModels(select, wrapper, info) {
  const models = info.models || [];
  const kept = select.value;
  clear(select);
  for (const { name, source } of models) {
    const option = make("option", null, name);
    option.value = name;
    if (source && source !== name) option.title = source;
    option.selected = kept ? name === kept : name === info.default_model;
    select.appendChild(option);
  }
  show(wrapper, models.length > 1);
}

// The tasks of the model chosen in `modelSelect` go into `taskSelect`, keeping the task when
// that model has it too.
export function fillTasksOf(taskSelect, modelSelect, info) {
  const model = (info.models || []).find(({ name }) => name === modelSelect.value);
  const kept = taskSelect.value;
  const tasks = model ? model.tasks : info.tasks;
  const fallback = model ? model.default_task : info.default_task;
  fillTasks(taskSelect, tasks, tasks.some(({ task }) => task === kept) ? kept : fallback);
}

// The model to name in a request: none when the server has only one.
export function pickedModel(modelSelect, info) {
  return (info.models || []).length > 1 ? modelSelect.value : null;
}

export function seconds(value) {
  return value == null ? "–" : `${Number(value).toFixed(value < 10 ? 2 : 1)} s`;
}

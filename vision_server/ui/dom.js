// Small DOM helpers. Text from the server (captions, file names) only ever goes in as text.

export const $ = (id) => document.getElementById(id);

export function setText(element, text) {
  element.textContent = text == null ? "" : String(text);
}

export function show(element, visible = true) {
  element.hidden = !visible;
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

export function seconds(value) {
  return value == null ? "–" : `${Number(value).toFixed(value < 10 ? 2 : 1)} s`;
}

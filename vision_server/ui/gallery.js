// The gallery: pages of thumbnails with every caption source side by side, search and filter,
// editing the .txt caption, fresh captions from the model, re-captioning and exporting a selection.

import { api, apiJson, postJson } from "./api.js";
import { $, announce, announced, clear, fillModels, fillTasksOf, make, pickedModel, setText, show, tell } from "./dom.js";

const CHUNK = 16; // images per re-caption request, so the page shows progress
const THUMBS_AT_ONCE = 6;

const state = { page: 1, pages: 1, q: "", field: "all", has: "any", writable: false };
const selected = new Set(); // image paths, kept across pages and searches
const cards = new Map(); // path -> card element on the current page
// path -> .txt text typed but not saved. Kept across pages, searches and re-captions (redrawing a
// card puts it back in the box), and a reload or closing the tab asks first.
const drafts = new Map();
const names = new Map(); // path -> the name shown (a name that is not UTF-8 with \xNN for its bytes)
let shown = null; // the /ui/api/info the page was drawn from
let thumbUrls = [];
let started = false;
let loading = 0;
let thumbNotice = ""; // the last "N thumbnails could not be shown", gone with the next page
let loadFailure = ""; // the last page that could not be listed, gone once one is
let cardCount = 0; // for ids unique on the page
let alertFrom = null; // the path of the card whose error the gallery's alert says, if it is one

// The gallery's own line: progress and results politely, an error of the whole page as an alert.
// Progress empties the alert of an older page error, not a card's error: that is about its card.
function message(text, isError = false) {
  if (!isError && alertFrom !== null) {
    setText($("gallery-message"), text);
    return;
  }
  tell($("gallery-message"), $("gallery-alert"), text, isError);
  alertFrom = null;
}

// Whether a message names the image `name` already (the server's "a.jpg shares its caption
// file ..." or "Cannot write the caption file a.txt of a.jpg: ..."): the name as a whole word,
// not the end of another path (sub/a.jpg) nor the start of another name (a.jpg.bak).
function namesImage(text, name) {
  for (let at = text.indexOf(name); at >= 0; at = text.indexOf(name, at + 1)) {
    const before = at === 0 ? " " : text[at - 1];
    const after = text.slice(at + name.length, at + name.length + 2);
    if (/\s/.test(before) && /^($|[\s:;,)]|\.($|\s))/.test(after)) return true;
  }
  return false;
}

// A card's message as heard away from its card: with the image's name first, unless it names
// the image itself ("a.jpg: a.jpg shares its caption file ..." said it twice).
function aboutCard(path, text) {
  const name = names.get(path) ?? path;
  return namesImage(text, name) ? text : `${name}: ${text}`;
}

// A card's own line: "saved", "unsaved changes", progress; a failed save or caption in red. The
// card's lines are not live regions (48 cards were 48 regions for a screen reader to track):
// what a card says is read out once, with the image's name, through the gallery's one echo
// region (politely) or its one alert (an error, at once). The card's next message takes its
// error out of the alert, as a new message takes it off the card.
function cardMessage(card, text, isError = false) {
  const path = card.dataset.path;
  setText(card.querySelector(".card-message"), isError ? "" : text);
  setText(card.querySelector(".card-error"), isError ? text : "");
  if (isError) {
    announce($("gallery-alert"), aboutCard(path, text));
    alertFrom = path;
    return;
  }
  if (alertFrom === path) {
    announce($("gallery-alert"), "");
    alertFrom = null;
  }
  if (text) announce($("card-status"), aboutCard(path, text));
}

function updateSelection() {
  setText($("selected-count"), `${selected.size} selected`);
  for (const [path, card] of cards) {
    card.querySelector(".pick").checked = selected.has(path);
    card.classList.toggle("selected", selected.has(path));
  }
}

// Ctrl+S (Cmd+S on a Mac) or Ctrl+Enter in a caption box saves it: no reaching for the mouse.
function isSaveKey(event) {
  return (event.ctrlKey || event.metaKey) && (event.key === "s" || event.key === "S" || event.key === "Enter");
}

const UNSAVED = "unsaved changes (Ctrl+S saves)";

function markUnsaved(card, unsaved) {
  if (card.classList.contains("unsaved") === unsaved) return; // say it once, not at every key
  card.classList.toggle("unsaved", unsaved);
  cardMessage(card, unsaved ? UNSAVED : "");
}

function sourceBox(item, source, card) {
  const box = make("div", `source source-${source.kind}`);
  box.dataset.source = source.name;
  box.appendChild(make("div", "source-name", source.kind === "sidecar" ? `file ${source.name}` : source.name));
  if (source.kind === "sidecar" && source.name === ".txt") {
    const edit = make("textarea", "edit");
    const saved = source.text ?? "";
    edit.value = drafts.get(item.path) ?? saved;
    edit.placeholder = "(no .txt caption yet)";
    edit.setAttribute("aria-label", `caption of ${item.name}`);
    edit.addEventListener("input", () => {
      if (edit.value === saved) drafts.delete(item.path);
      else drafts.set(item.path, edit.value);
      markUnsaved(card, drafts.has(item.path));
    });
    edit.addEventListener("keydown", (event) => {
      if (!isSaveKey(event)) return;
      event.preventDefault();
      saveCaption(item.path, edit.value, card);
    });
    const save = make("button", "save", "Save");
    save.type = "button";
    save.setAttribute("aria-label", `Save caption of ${item.name}`);
    save.addEventListener("click", () => saveCaption(item.path, edit.value, card));
    box.appendChild(edit);
    box.appendChild(save);
  } else {
    box.appendChild(make("p", "source-text", source.text ?? "(none)"));
  }
  return box;
}

// Redraws the card's sources. Focus in the caption box or on Save stays there (on the new one),
// so a keyboard user who saved is not thrown back to the top of the page.
function fillCard(card, item) {
  const sources = card.querySelector(".sources");
  const focused = sources.contains(document.activeElement) ? document.activeElement : null;
  const where = focused?.classList.contains("edit") ? [focused.selectionStart, focused.selectionEnd] : null;
  clear(sources);
  for (const source of item.sources) sources.appendChild(sourceBox(item, source, card));
  if (focused?.classList.contains("save")) sources.querySelector(".save")?.focus();
  const edit = sources.querySelector(".edit");
  if (where && edit) {
    edit.focus();
    edit.setSelectionRange(...where);
  }
  if (drafts.has(item.path)) markUnsaved(card, true);
}

function makeCard(item) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.path = item.path;
  names.set(item.path, item.name);
  setText(card.querySelector(".name"), item.name);
  const pick = card.querySelector(".pick");
  pick.addEventListener("change", () => {
    if (pick.checked) selected.add(item.path);
    else selected.delete(item.path);
    updateSelection();
  });
  const fresh = card.querySelector(".fresh");
  fresh.setAttribute("aria-label", `Caption now: ${item.name}`);
  fresh.addEventListener("click", () => recaption([item.path], false, card));
  const open = card.querySelector(".thumb-open");
  open.setAttribute("aria-label", `Show ${item.name} full size`);
  const broken = card.querySelector(".thumb-error");
  broken.id = `thumb-error-${++cardCount}`;
  open.setAttribute("aria-describedby", broken.id); // why there is no thumbnail, heard on the button
  open.addEventListener("click", () => showImage(item));
  if (drafts.has(item.path)) {
    // Drawn with its draft (back on its page): shown, not read out again for every such card.
    card.classList.add("unsaved");
    setText(card.querySelector(".card-message"), UNSAVED);
  }
  fillCard(card, item);
  return card;
}

// An image in a URL: its `ref`, the server's percent-encoding of the name's bytes. A name that
// is not UTF-8 holds lone surrogates, which encodeURIComponent refuses (URIError).
function fileUrl(route, item) {
  return `/ui/api/gallery/${route}?path=${item.ref}`;
}

async function showImage(item) {
  const path = item.name;
  const viewer = $("viewer");
  setText($("viewer-name"), path);
  const image = $("viewer-image");
  image.alt = path;
  // The file came but the browser cannot draw it (not really an image, or a format it lacks).
  image.onerror = () => {
    if (image.src) announce($("viewer-error"), `${path} cannot be shown: the browser cannot read it as an image.`);
  };
  if (image.src) URL.revokeObjectURL(image.src);
  image.removeAttribute("src");
  announce($("viewer-error"), "");
  if (!viewer.open) viewer.showModal();
  try {
    const blob = await (await api(fileUrl("image", item))).blob();
    image.src = URL.createObjectURL(blob);
  } catch (error) {
    announce($("viewer-error"), error.message); // an alert: the image asked for will not come
  }
}

// Thumbnails a few at a time. One that fails is marked on its card, quietly; the page then says
// once how many failed: a folder of 200 broken images is one announcement, not 200.
async function loadThumbs(items, ticket) {
  const queue = [...items];
  let failed = 0;
  const worker = async () => {
    while (queue.length) {
      const item = queue.shift();
      const card = cards.get(item.path);
      if (!card) continue;
      try {
        const blob = await (await api(fileUrl("thumb", item))).blob();
        const url = URL.createObjectURL(blob);
        thumbUrls.push(url);
        card.querySelector(".thumb").src = url;
      } catch (error) {
        failed += 1;
        card.querySelector(".thumb").classList.add("broken");
        const note = card.querySelector(".thumb-error");
        setText(note, error.message);
        show(note, true);
      }
    }
  };
  await Promise.all(Array.from({ length: THUMBS_AT_ONCE }, worker));
  if (ticket !== loading || !failed) return; // a newer page has its own count
  thumbNotice = `${failed} thumbnail${failed === 1 ? "" : "s"} could not be shown`;
  message(thumbNotice);
}

// Unsaved captions not on this page, named (a few), so they are not forgotten on page 37.
function draftsElsewhere() {
  const away = [...drafts.keys()].filter((path) => !cards.has(path));
  if (!away.length) return "";
  const more = away.length > 3 ? ` and ${away.length - 3} more` : "";
  const shownNames = away.slice(0, 3).map((path) => names.get(path) ?? path);
  return ` · unsaved on other pages: ${shownNames.join(", ")}${more}`;
}

async function load() {
  const ticket = ++loading;
  const query = new URLSearchParams({ page: state.page, q: state.q, field: state.field, has: state.has });
  document.body.dataset.gallery = "loading";
  let data;
  try {
    data = await apiJson(`/ui/api/gallery?${query}`);
  } catch (error) {
    loadFailure = error.message;
    message(loadFailure, true);
    document.body.dataset.gallery = "failed";
    return;
  }
  if (ticket !== loading) return; // a newer search or page replaced this one
  if (thumbNotice && $("gallery-message").textContent === thumbNotice) message("");
  if (loadFailure && announced($("gallery-alert")) === loadFailure) message("");
  if (alertFrom !== null) announce($("gallery-alert"), ""); // its card is drawn anew, without it
  announce($("card-status"), ""); // about a card no longer shown
  alertFrom = null;
  thumbNotice = "";
  loadFailure = "";
  Object.assign(state, { page: data.page, pages: data.pages, writable: data.writable });
  for (const url of thumbUrls) URL.revokeObjectURL(url);
  thumbUrls = [];
  cards.clear();
  const grid = $("grid");
  clear(grid);
  for (const item of data.items) {
    const card = makeCard(item);
    cards.set(item.path, card);
    grid.appendChild(card);
  }
  const filtered = data.total === data.all ? "" : ` (of ${data.all})`;
  setText($("page-info"), `page ${data.page} of ${data.pages} · ${data.total} images${filtered}${draftsElsewhere()}`);
  // The pager button just pressed may now be disabled (last or first page): focus goes to the
  // other one rather than back to the top of the page.
  const pressed = document.activeElement;
  $("prev").disabled = data.page <= 1;
  $("next").disabled = data.page >= data.pages;
  if (pressed === $("next") && pressed.disabled && !$("prev").disabled) $("prev").focus();
  if (pressed === $("prev") && pressed.disabled && !$("next").disabled) $("next").focus();
  updateSelection();
  document.body.dataset.gallery = "ready";
  loadThumbs(data.items, ticket);
}

async function saveCaption(path, text, card) {
  cardMessage(card, "saving…");
  try {
    const item = await postJson("/ui/api/gallery/save", { path, source: ".txt", text });
    if (drafts.get(path) === text) drafts.delete(path); // typing went on while it saved: keep that
    card.classList.remove("unsaved");
    fillCard(card, item);
    if (!drafts.has(path)) cardMessage(card, "saved");
  } catch (error) {
    cardMessage(card, error.message, true);
  }
}

async function recaption(paths, save, card = null) {
  const task = $("gallery-task").value;
  const model = pickedModel($("gallery-model"), shown);
  const withModel = model ? `${model} ${task}` : task;
  let done = 0;
  let failed = 0;
  const say = (text, isError = false) => (card ? cardMessage(card, text, isError) : message(text, isError));
  say(`captioning ${paths.length} image(s) with ${withModel}…`);
  document.body.dataset.recaption = "running";
  try {
    for (let start = 0; start < paths.length; start += CHUNK) {
      const body = { paths: paths.slice(start, start + CHUNK), task, save };
      if (model) body.model = model;
      const reply = await postJson("/ui/api/gallery/recaption", body);
      for (const item of reply.items) {
        const shown = cards.get(item.path);
        if (shown) fillCard(shown, item);
      }
      let reason = "";
      for (const result of reply.results) {
        if (result.error) failed += 1;
        else done += 1;
        reason = result.error || reason;
      }
      // Caption now on one image: what went wrong with it, as an alert. A selection counts its
      // failures in the progress line instead of reading out each one.
      if (card && reason) say(`${reason} (${withModel})`, true);
      else say(`captioned ${done} of ${paths.length} with ${withModel}${failed ? `, ${failed} failed` : ""}`);
    }
    document.body.dataset.recaption = "done";
  } catch (error) {
    say(`${error.message} (${done} of ${paths.length} done)`, true);
    document.body.dataset.recaption = "failed";
  }
}

async function exportSelected() {
  if (!selected.size) {
    message("Select some images first.", true);
    return;
  }
  try {
    const response = await api("/ui/api/gallery/export", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ paths: [...selected] }),
    });
    const url = URL.createObjectURL(await response.blob());
    const link = make("a");
    link.href = url;
    link.download = "captions.jsonl";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    message(`exported ${selected.size} caption row(s)`);
  } catch (error) {
    message(error.message, true);
  }
}

export function startGallery(info) {
  const gallery = info.gallery;
  setText($("gallery-name"), gallery.name);
  setText($("gallery-mode"), gallery.writable ? "writable" : "read-only");
  $("recaption-save").disabled = !gallery.writable;
  shown = info;
  fillModels($("gallery-model"), $("gallery-model-choice"), info);
  fillTasksOf($("gallery-task"), $("gallery-model"), info);
  if (!started) {
    started = true;
    $("gallery-model").addEventListener("change", () => fillTasksOf($("gallery-task"), $("gallery-model"), shown));
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      Object.assign(state, { page: 1, q: $("q").value, field: $("field").value, has: $("has").value });
      load();
    });
    $("prev").addEventListener("click", () => {
      state.page -= 1;
      load();
    });
    $("next").addEventListener("click", () => {
      state.page += 1;
      load();
    });
    $("select-page").addEventListener("click", () => {
      for (const path of cards.keys()) selected.add(path);
      updateSelection();
    });
    $("select-none").addEventListener("click", () => {
      selected.clear();
      updateSelection();
    });
    $("recaption").addEventListener("click", () => {
      if (!selected.size) message("Select some images first.", true);
      else recaption([...selected], $("recaption-save").checked);
    });
    $("export").addEventListener("click", exportSelected);
    $("viewer-close").addEventListener("click", () => $("viewer").close());
    window.addEventListener("beforeunload", (event) => {
      if (drafts.size) event.preventDefault(); // the browser asks before unsaved captions go
    });
  }
  load();
}

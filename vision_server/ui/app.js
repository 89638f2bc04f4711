// The page: ask for the API key when the server wants one, then show Try it, Gallery and Status.

import { ApiError, apiJson, forgetKey, storeKey, storedKey, whenUnauthorized } from "./api.js";
import { $, setText, show } from "./dom.js";
import { startGallery } from "./gallery.js";
import { startStatus } from "./status.js";
import { startTry } from "./tryit.js";

const PAGES = ["try", "gallery", "status"];
let info = null;

function route() {
  if (!info) return;
  let wanted = (location.hash || "#try").slice(1);
  if (!PAGES.includes(wanted) || (wanted === "gallery" && !info.gallery)) wanted = "try";
  for (const name of PAGES) {
    show($(`page-${name}`), name === wanted);
    const link = $(`nav-${name}`);
    link.classList.toggle("active", name === wanted);
    if (name === wanted) link.setAttribute("aria-current", "page"); // heard, not only underlined
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.page = wanted;
}

function askForKey(message) {
  show($("key-panel"), true);
  for (const name of PAGES) show($(`page-${name}`), false);
  setText($("key-error"), storedKey() ? message : "");
  $("key-input").focus();
}

async function start() {
  try {
    info = await apiJson("/ui/api/info");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askForKey(error.message);
    } else {
      show($("load-error"), true);
      setText($("load-error"), `The page could not start: ${error.message}`);
    }
    return;
  }
  show($("key-panel"), false);
  show($("load-error"), false);
  show($("forget-key"), Boolean(storedKey()));
  show($("nav-gallery"), Boolean(info.gallery));
  startTry(info);
  startStatus(info);
  if (info.gallery) startGallery(info);
  route();
  document.body.dataset.ready = "true";
}

whenUnauthorized((message) => {
  info = null;
  delete document.body.dataset.ready;
  askForKey(message);
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  storeKey(key);
  $("key-input").value = "";
  start();
});

$("forget-key").addEventListener("click", () => {
  forgetKey();
  location.reload();
});

window.addEventListener("hashchange", route);
start();

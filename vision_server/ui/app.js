// The page: ask for the API key when the server wants one, then show Try it, Gallery and Status
// as tabs.

import { ApiError, apiJson, forgetKey, storeKey, storedKey, whenUnauthorized } from "./api.js";
import { $, announce, quietView, show } from "./dom.js";
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
    const shown = name === wanted;
    show($(`page-${name}`), shown);
    if (!shown) quietView($(`page-${name}`)); // its old alerts are not read out again on return
    const tab = $(`nav-${name}`);
    tab.setAttribute("aria-selected", String(shown)); // heard, not only underlined
    tab.tabIndex = shown ? 0 : -1; // one stop for the whole tab list: Tab goes on into the panel
  }
  document.body.dataset.page = wanted;
}

// Keys of the WAI-ARIA tabs pattern: the arrows move to the next or previous tab (round the
// ends) and show it, Home and End to the first and last; Space shows the focused one (Enter
// does, as on any link).
const TAB_KEYS = { ArrowRight: 1, ArrowLeft: -1, Home: "first", End: "last", " ": 0 };

function onTabKey(event) {
  const step = TAB_KEYS[event.key];
  if (step === undefined || event.altKey || event.ctrlKey || event.metaKey) return;
  const tabs = PAGES.map((name) => $(`nav-${name}`)).filter((tab) => !tab.hidden);
  const at = tabs.indexOf(document.activeElement);
  if (at < 0) return;
  event.preventDefault();
  let next = tabs[at];
  if (step === "first") next = tabs[0];
  else if (step === "last") next = tabs[tabs.length - 1];
  else next = tabs[(at + step + tabs.length) % tabs.length];
  next.focus();
  if (location.hash !== next.hash) location.hash = next.hash;
}

function askForKey(message) {
  show($("key-panel"), true);
  show($("tabs"), false);
  for (const name of PAGES) {
    show($(`page-${name}`), false);
    quietView($(`page-${name}`));
  }
  announce($("key-error"), storedKey() ? message : "");
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
      announce($("load-error"), `The page could not start: ${error.message}`);
    }
    return;
  }
  show($("key-panel"), false);
  show($("load-error"), false);
  show($("forget-key"), Boolean(storedKey()));
  show($("nav-gallery"), Boolean(info.gallery));
  show($("tabs"), true);
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

$("tabs").addEventListener("keydown", onTabKey);
window.addEventListener("hashchange", route);
start();

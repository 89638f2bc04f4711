// Talking to the server: the API key (kept in this tab's session storage), Bearer headers, errors.

const KEY_NAME = "vision-server-api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
}

let onUnauthorized = () => {};

/** Called with the refusal message whenever the server answers 401 (the page then asks for the key). */
export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

/** fetch() on this server with the key; resolves to the Response, rejects with ApiError on 4xx/5xx. */
export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, `The server cannot be reached (${error.message}).`);
  }
  if (response.ok) return response;
  const message = await errorMessage(response);
  if (response.status === 401) onUnauthorized(message);
  throw new ApiError(response.status, message);
}

export async function apiJson(path, options = {}) {
  return (await api(path, options)).json();
}

export function postJson(path, body) {
  return apiJson(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    const found = (body.error && body.error.message) || body.detail || body.error;
    if (typeof found === "string") return `${found} (HTTP ${response.status})`;
  } catch (ignored) {
    // not JSON: fall through to the raw text
  }
  return `HTTP ${response.status}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

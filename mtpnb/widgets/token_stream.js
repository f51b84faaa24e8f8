// The front end of mtpnb.widgets.TokenStream (token_stream.py): tokens appended as they are decided,
// coloured by kind. Streaming batches arrive as custom messages (a "replay" replaces those held);
// `initialize` (once per model) keeps them in a store, so a view created after the stream began still
// shows every token; each
// view appends new ones on its next animation frame. The `tokens` trait holds the final state and
// is rendered whole when it changes. A token record: [kind, text, position, step, p, q].

const KINDS = {
  accepted: ["accepted draft", "line above"],
  rejected: ["rejected draft", "struck through"],
  correction: ["correction", "wavy underline"],
  bonus: ["bonus", "bold"],
  plain: ["plain", "no mark"],
};

const STATUS = {
  idle: "ready",
  running: "generating…",
  done: "done",
  cancelled: "stopped",
  error: "error",
};

// Control characters would vanish or break the layout: show their Unicode "control pictures".
// A rejected draft is not part of the output, so its newlines and tabs are shown, not laid out.
const CONTROL = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g;
const REJECTED_WHITESPACE = { "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d" };

function visible(text, rejected) {
  let shown = text.replace(CONTROL, (c) =>
    c === "\x7f" ? "\u2421" : String.fromCharCode(0x2400 + c.charCodeAt(0)),
  );
  if (rejected) shown = shown.replace(/[\n\t\r]/g, (c) => REJECTED_WHITESPACE[c]);
  return shown;
}

function describe([kind, , position, step, p, q]) {
  const parts = [KINDS[kind][0]];
  if (position) parts.push(`position ${position}`);
  parts.push(`step ${step}`);
  if (p !== null && p !== undefined) parts.push(`p=${p.toFixed(3)}`);
  if (q !== null && q !== undefined) parts.push(`q=${q.toFixed(3)}`);
  return parts.join(" · ");
}

function tokenSpan(record) {
  const span = document.createElement("span");
  span.className = `mtp-tok mtp-tok-${record[0]}`;
  span.textContent = visible(record[1], record[0] === "rejected");
  const label = describe(record);
  span.title = label;
  span.setAttribute("aria-label", label);
  return span;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The streamed records of each model (keyed by its `_stream_key` trait), and the views to tell.
const STORES = new Map();

// anywidget (0.11) gives a model 2 s from its creation to load this module and run `initialize`; on a
// busy CPU it can miss that, logs "[anywidget] Failed to initialize model." and from then on drops every
// message the kernel sends to that model (its _handle_comm_msg awaits the rejected promise first), trait
// updates included: the view would sit "ready" and empty while the kernel's generation ran to its end.
// Once this module runs, that wait has no purpose, so this model's comm messages go straight to the
// widget base class's handler, and the kernel is asked for the state it sent meanwhile and, while it
// streams, for the token batches (a "replay" message that replaces the store's records). `initialize`
// gets a proxy of the model (get, set, on, send...), not the model: the model is looked up by its id,
// which the kernel side makes equal to `_stream_key`. Where any of this is missing (no kernel, another
// widget manager), nothing changes.
async function keepListening(proxy) {
  const model = await proxy.widget_manager?.get_model?.(proxy.get("_stream_key"));
  const base = model && Object.getPrototypeOf(Object.getPrototypeOf(model));
  const comm = model?.comm;
  if (typeof base?._handle_comm_msg !== "function" || typeof comm?.on_msg !== "function") return;
  comm.on_msg((msg) => base._handle_comm_msg.call(model, msg));
  if (typeof comm.send !== "function") return;
  comm.send({ method: "request_state" }, model.callbacks?.());
  proxy.send({ type: "replay" });
}

function initialize({ model }) {
  keepListening(model).catch((error) => console.warn("[mtpnb] TokenStream: anywidget's wait not bypassed:", error));
  const key = model.get("_stream_key");
  const store = { records: [], progress: null, views: new Set() };
  STORES.set(key, store);
  function onMessage(msg) {
    if (msg.type !== "tokens" && msg.type !== "replay") return;
    if (msg.type === "replay") store.records = [];
    for (const record of msg.tokens) store.records.push(record);
    store.progress = msg;
    for (const view of store.views) view(msg);
  }
  function onStatus() {
    if (model.get("status") !== "running") return;
    store.records = [];
    store.progress = null;
  }
  model.on("msg:custom", onMessage);
  model.on("change:status", onStatus);
  return () => {
    model.off("msg:custom", onMessage);
    model.off("change:status", onStatus);
    STORES.delete(key);
  };
}

function render({ model, el }) {
  const store = STORES.get(model.get("_stream_key"));
  const root = element("div", "mtp-stream");
  const head = element("div", "mtp-head");
  const label = element("span", "mtp-label");
  const status = element("span", "mtp-status");
  status.setAttribute("role", "status");
  const live = element("span", "mtp-live");
  head.append(label, status, live);

  const legend = element("div", "mtp-legend");
  const counts = {};
  for (const [kind, [name, cue]] of Object.entries(KINDS)) {
    const item = element("span", "mtp-legend-item");
    item.title = `${name}: ${cue}`;
    const swatch = element("span", `mtp-tok mtp-tok-${kind}`, name);
    counts[kind] = element("span", "mtp-count", "0");
    item.append(swatch, counts[kind]);
    legend.append(item);
  }
  const toggle = element("label", "mtp-toggle");
  const checkbox = document.createElement("input");
  checkbox.type = "checkbox";
  toggle.append(checkbox, " hide rejected drafts");
  legend.append(toggle);

  const body = element("pre", "mtp-text");
  body.tabIndex = 0;
  body.setAttribute("aria-label", "generated text");
  const prompt = element("span", "mtp-prompt");
  const out = element("span", "mtp-out");
  body.append(prompt, out);

  const summary = element("div", "mtp-summary");
  const error = element("div", "mtp-error");
  error.setAttribute("role", "alert");

  root.append(head, legend, body, summary, error);
  el.append(root);

  let queue = [];
  let frame = 0;
  const tally = {};

  const atBottom = () => body.scrollHeight - body.scrollTop - body.clientHeight < 8;
  function append(records) {
    const stick = atBottom();
    const fragment = document.createDocumentFragment();
    for (const record of records) {
      fragment.append(tokenSpan(record));
      tally[record[0]] = (tally[record[0]] || 0) + 1;
    }
    out.append(fragment);
    for (const kind in counts) counts[kind].textContent = String(tally[kind] || 0);
    if (stick) body.scrollTop = body.scrollHeight;
  }
  function reset() {
    cancelAnimationFrame(frame);
    frame = 0;
    queue = [];
    out.replaceChildren();
    for (const kind in KINDS) tally[kind] = 0;
  }
  function drain() {
    frame = 0;
    const records = queue;
    queue = [];
    append(records);
  }

  function showProgress(msg) {
    if (msg && msg.elapsed > 0) {
      live.textContent = `${msg.generated} tokens · ${(msg.generated / msg.elapsed).toFixed(1)} tok/s so far`;
    }
  }
  function onBatch(msg) {
    if (msg.type === "replay") reset();
    for (const record of msg.tokens) queue.push(record);
    showProgress(msg);
    if (!frame) frame = requestAnimationFrame(drain);
  }
  function onTokens() {
    reset();
    const streaming = model.get("status") === "running";
    append(streaming ? store.records : model.get("tokens"));
    if (streaming) showProgress(store.progress);
  }
  function onStatus() {
    const value = model.get("status");
    const reason = model.get("finish_reason");
    root.dataset.status = value;
    root.dataset.depth = String(model.get("depth"));
    status.textContent = STATUS[value] + (value === "done" && reason ? ` (${reason})` : "");
    body.setAttribute("aria-busy", String(value === "running"));
    if (value === "running") reset();
    live.textContent = "";
  }
  function onError() {
    const [first, ...rest] = model.get("error").split("\n");
    error.replaceChildren();
    if (!first) return;
    error.append(element("strong", "", first));
    if (rest.length) {
      const details = element("details");
      details.append(element("summary", "", "details"), element("pre", "", rest.join("\n")));
      error.append(details);
    }
  }
  const onPrompt = () => (prompt.textContent = visible(model.get("prompt"), false));
  const onLabel = () => (label.textContent = model.get("label"));
  const onSummary = () => (summary.textContent = model.get("summary"));
  function onHide() {
    checkbox.checked = model.get("hide_rejected");
    root.classList.toggle("mtp-hide-rejected", checkbox.checked);
  }
  function onToggle() {
    model.set("hide_rejected", checkbox.checked);
    model.save_changes();
  }

  const listeners = [
    ["change:tokens", onTokens],
    ["change:status", onStatus],
    ["change:finish_reason", onStatus],
    ["change:error", onError],
    ["change:prompt", onPrompt],
    ["change:label", onLabel],
    ["change:summary", onSummary],
    ["change:hide_rejected", onHide],
    ["change:depth", onStatus],
  ];
  for (const [name, fn] of listeners) model.on(name, fn);
  store.views.add(onBatch);
  checkbox.addEventListener("change", onToggle);
  for (const fn of [onStatus, onTokens, onError, onPrompt, onLabel, onSummary, onHide]) fn();

  return () => {
    cancelAnimationFrame(frame);
    for (const [name, fn] of listeners) model.off(name, fn);
    store.views.delete(onBatch);
    checkbox.removeEventListener("change", onToggle);
  };
}

export default { initialize, render };

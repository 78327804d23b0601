"use strict";
// The chat page of `hearth serve`. It uses the server's public routes only: /v1/models, /v1/chat/completions
// (OpenAI, streamed), /api/show, /api/ps and the empty /api/chat that loads a model (Ollama).
// Conversations and settings live in localStorage, the API key (when the server wants one) in sessionStorage.
// Images and audio (for a model that takes them) go as OpenAI content parts; each over 1 MB is not stored.

const $ = (id) => document.getElementById(id);
const { Marked, DOMPurify, hljs } = window.vendor;

// -- what the page keeps -------------------------------------------------------------------------------------
function loadJSON(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}
const saveJSON = (key, value) => localStorage.setItem(key, JSON.stringify(value));

let conversations = loadJSON("hearth.conversations", []);
let current = loadJSON("hearth.current", null);
const settings = {
  model: null, system: "", temperature: 0.7, maxTokens: 1024, thinking: false, schema: "", tools: "",
  ...loadJSON("hearth.settings", {}),
};
const models = {}; // id -> {capabilities, modalities, context, loaded}
let running = null; // the AbortController of the reply being streamed

const KEEP = 1_000_000; // characters of a data URL kept in localStorage; a bigger one shows as a placeholder
const stored = (drop) => conversations.map((c) => ({ ...c, messages: c.messages.map((m) => (!m.media ? m : {
  ...m, media: m.media.map((x) => (x.url && (drop || x.url.length > KEEP) ? { ...x, url: null } : x)),
})) }));

function save() {
  try {
    saveJSON("hearth.conversations", stored(false));
  } catch { // the browser's quota (5 MB or so) is full: keep the words, not the media
    saveJSON("hearth.conversations", stored(true));
  }
  saveJSON("hearth.current", current);
  saveJSON("hearth.settings", settings);
}
const conversation = () => conversations.find((c) => c.id === current);

// -- talking to the server -----------------------------------------------------------------------------------
class Problem extends Error {
  constructor(title, message) {
    super(message);
    this.title = title;
  }
}

// The reason a request failed, in words for the person at the page.
function explain(message, status, code) {
  if (code === "context_length_exceeded") {
    return new Problem("Too long for this model's context", `${message} Start a new chat or delete earlier turns.`);
  }
  if (/failed to load|memory budget/.test(message) || status === 507) {
    return new Problem("The model could not be loaded", message);
  }
  if (status === 401) return new Problem("Wrong or missing API key", message);
  return new Problem(status >= 500 ? "The server failed" : `The server refused the request (${status})`, message);
}

const gone = () => new Problem("The server is not answering", "Is `hearth serve` still running? Start it, then retry.");

async function api(path, body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("hearth.key");
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = body === undefined ? { headers, signal }
      : { method: "POST", headers, body: JSON.stringify(body), signal };
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw e.name === "AbortError" ? e : gone();
    }
    if (r.status === 401) {
      sessionStorage.removeItem("hearth.key");
      const given = attempt === 0 && window.prompt("This server needs its API key (hearth serve --api-key):");
      if (given) {
        sessionStorage.setItem("hearth.key", given.trim());
        continue;
      }
    }
    if (r.ok) return r;
    let message = `HTTP ${r.status}`, code = null;
    try {
      const e = (await r.json()).error;
      [message, code] = typeof e === "string" ? [e, null] : [e.message, e.code];
    } catch {} // not JSON: the status says it
    throw explain(message, r.status, code);
  }
}

// The data of each server-sent event, until [DONE]; a stream that ends before it was cut.
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let read;
    try {
      read = await reader.read();
    } catch (e) {
      throw e.name === "AbortError" ? e : gone();
    }
    if (read.done) {
      throw new Problem("The connection was lost", "The reply stopped half-way: the server may have stopped.");
    }
    buffer += decoder.decode(read.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// -- models --------------------------------------------------------------------------------------------------
async function loadModels() {
  const picker = $("model");
  const { data } = await (await api("/v1/models")).json();
  const chat = data.filter((m) => (m.capabilities ?? ["completion"]).includes("completion"));
  picker.replaceChildren(...chat.map((m) => new Option(m.id, m.id)));
  for (const m of chat) {
    const modalities = m.input_modalities ?? ["text"];
    models[m.id] = { capabilities: m.capabilities ?? [], modalities, context: null, loaded: false };
  }
  if (!chat.length) return setStatus("", "no models: `hearth pull ID` adds one");
  picker.value = models[settings.model] ? settings.model : chat[0].id;
  await pick(picker.value);
}

function setStatus(kind, text) {
  const status = $("model-status");
  status.className = `status ${kind}`;
  status.textContent = text;
}

// Shows the model's context and loads it (the spinner shows while it loads), so the first reply needs no wait.
async function pick(name) {
  settings.model = name;
  save();
  const m = models[name];
  $("thinking").disabled = !m.capabilities.includes("thinking");
  showAttach();
  try {
    if (m.context === null) {
      const info = (await (await api("/api/show", { model: name })).json()).model_info ?? {};
      m.context = Object.entries(info).find(([k]) => k.endsWith(".context_length"))?.[1] ?? null;
    }
    const { models: loaded } = await (await api("/api/ps")).json();
    m.loaded = loaded.some((x) => x.name.replace(/:latest$/, "") === name);
    if (!m.loaded) {
      setStatus("loading", "loading…");
      await api("/api/chat", { model: name, messages: [] });
      m.loaded = true;
    }
    if (settings.model === name) setStatus("ready", m.context ? `context ${m.context}` : "ready");
  } catch (e) {
    if (settings.model === name) setStatus("failed", `${e.title}: ${e.message}`);
  }
}

// -- rendering -----------------------------------------------------------------------------------------------
// Markdown with HTML kept as text: a reply's <img onerror> or <script> is shown, never made an element; DOMPurify
// then drops whatever else could run (javascript: links and the like).
const escapeHTML = (s) => s.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
const markdown = new Marked({ gfm: true, renderer: { html: ({ text }) => escapeHTML(text) } });
const toHTML = (text) => DOMPurify.sanitize(markdown.parse(text));

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function decorateCode(root) {
  for (const code of root.querySelectorAll("pre > code")) {
    const text = code.textContent, lang = /language-(\S+)/.exec(code.className)?.[1];
    const out = lang && hljs.getLanguage(lang) ? hljs.highlight(text, { language: lang }) : hljs.highlightAuto(text);
    code.innerHTML = out.value; // highlight.js escapes the text it wraps in its spans
    code.classList.add("hljs");
    const copy = element("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(text, copy));
    code.parentElement.prepend(copy);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch { // no clipboard API (a page served over plain http to another machine): the old way
    const area = element("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function renderReply(el, m) {
  const wasOpen = el.querySelector(".thinking")?.open ?? false;
  el.replaceChildren();
  if (m.reasoning) {
    const details = element("details", "thinking");
    details.open = wasOpen;
    const title = m.content || m.done ? "Thought" : "Thinking…";
    details.append(element("summary", "", title), element("div", "", m.reasoning));
    el.append(details);
  }
  for (const call of m.calls ?? []) {
    el.append(element("div", "call", `call ${call.name}(${call.arguments})`));
  }
  const body = element("div", "content");
  body.innerHTML = toHTML(m.content);
  decorateCode(body);
  el.append(body);
  if (m.progress) {
    const { processed, total } = m.progress;
    const bar = element("progress");
    [bar.max, bar.value] = [total, processed];
    el.append(element("div", "progress", `reading the prompt: ${processed} / ${total} tokens `), bar);
  } else if (m.pending) {
    el.append(element("div", "pending", m.pending));
  }
  if (m.error) {
    const box = element("div", "error");
    box.append(element("strong", "", m.error.title), element("div", "", m.error.message));
    el.append(box);
  }
  if (m.stats) el.append(element("div", "stats", m.stats));
}

// Thumbnails of images, chips for audio; `remove` adds a ✕ to each (the files about to be sent).
function mediaRow(media, remove) {
  const row = element("div", "media");
  media.forEach((x, i) => {
    const item = element("div", `item ${x.kind}`);
    if (!x.url) item.append(element("div", "gone", `${x.kind} not kept (over 1 MB)`));
    else if (x.kind === "image") item.append(Object.assign(element("img"), { src: x.url, alt: x.name }));
    else item.append(element("span", "icon", "♪"));
    item.append(element("span", "name", x.name));
    item.title = x.name;
    if (remove) {
      const button = element("button", "remove", "✕");
      [button.type, button.title] = ["button", `Remove ${x.name}`];
      button.addEventListener("click", () => remove(i));
      item.append(button);
    }
    row.append(item);
  });
  return row;
}

function renderMessages() {
  const list = $("messages");
  list.replaceChildren();
  for (const m of conversation()?.messages ?? []) {
    const el = element("div", `msg ${m.role}`);
    if (m.role === "user" && m.media?.length) el.append(mediaRow(m.media), m.content);
    else if (m.role === "user") el.textContent = m.content;
    else renderReply(el, m);
    list.append(el);
  }
  list.scrollTop = list.scrollHeight;
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const li = element("li", c.id === current ? "current" : "");
    const open = element("button", "title", c.title);
    const rename = element("button", "rename", "✎");
    const remove = element("button", "delete", "✕");
    [rename.title, remove.title] = ["Rename", "Delete"];
    open.addEventListener("click", () => {
      current = c.id;
      save();
      render();
      document.body.classList.remove("show-sidebar");
    });
    rename.addEventListener("click", () => {
      const title = window.prompt("Rename the conversation:", c.title);
      if (title?.trim()) c.title = title.trim();
      save();
      renderList();
    });
    remove.addEventListener("click", () => {
      if (!window.confirm(`Delete "${c.title}"?`)) return;
      conversations = conversations.filter((x) => x !== c);
      if (current === c.id) current = conversations[0]?.id ?? null;
      save();
      render();
    });
    li.append(open, rename, remove);
    list.append(li);
  }
}

function render() {
  renderList();
  renderMessages();
}

// -- sending -------------------------------------------------------------------------------------------------
function newConversation() {
  const id = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  const c = { id, title: "New chat", messages: [] };
  conversations.unshift(c);
  current = c.id;
  save();
  render();
  document.body.classList.remove("show-sidebar");
  return c;
}

function parsed(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Problem(`The ${what} is not valid JSON`, `${e.message} (see the settings)`);
  }
}

// A message's content: its text, or OpenAI content parts when it holds images or audio (media first).
function content(m) {
  const media = (m.media ?? []).filter((x) => x.url);
  if (!media.length) return m.content;
  const parts = media.map((x) => (x.kind === "image" ? { type: "image_url", image_url: { url: x.url } }
    : { type: "input_audio", input_audio: { data: x.url.slice(x.url.indexOf(",") + 1), format: x.format } }));
  return m.content ? [...parts, { type: "text", text: m.content }] : parts;
}

function request(history, model) {
  const messages = settings.system.trim() ? [{ role: "system", content: settings.system }] : [];
  for (const m of history) if (m.role === "user" || m.content) messages.push({ role: m.role, content: content(m) });
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true }, return_progress: true,
    temperature: Number(settings.temperature), max_tokens: Number(settings.maxTokens) || undefined,
  };
  if (models[model]?.capabilities.includes("thinking")) {
    body.chat_template_kwargs = { enable_thinking: settings.thinking };
  }
  if (settings.schema.trim()) {
    const schema = parsed(settings.schema, "JSON schema");
    body.response_format = { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
  }
  if (settings.tools.trim()) body.tools = parsed(settings.tools, "tools list");
  return body;
}

function addCalls(reply, deltas) {
  for (const d of deltas) {
    const call = (reply.calls[d.index ?? reply.calls.length] ??= { name: "", arguments: "" });
    call.name += d.function?.name ?? "";
    call.arguments += d.function?.arguments ?? "";
  }
}

function numbers(reply, usage, t0, tFirst, tEnd, pieces) {
  const parts = [reply.model];
  const tokens = usage?.completion_tokens ?? pieces;
  if (tFirst !== null) {
    parts.push(`${usage ? "" : "~"}${tokens} tokens`);
    if (tokens > 1 && tEnd > tFirst) parts.push(`${((tokens - 1) / ((tEnd - tFirst) / 1000)).toFixed(1)} tokens/s`);
    parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  }
  const context = models[reply.model]?.context;
  if (usage) parts.push(`context ${usage.total_tokens} / ${context ?? "?"}`);
  if (reply.stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function send(text, media) {
  const c = conversation() ?? newConversation();
  const model = $("model").value;
  c.messages.push(media.length ? { role: "user", content: text, media } : { role: "user", content: text });
  if (c.title === "New chat") c.title = (text || media[0].name).slice(0, 40);
  const reply = { role: "assistant", model, content: "", reasoning: "", calls: [] };
  reply.pending = models[model]?.loaded ? "waiting for the model…" : "loading the model…";
  c.messages.push(reply);
  save();
  render();
  const el = $("messages").lastElementChild;
  let frame = 0;
  const update = () => (frame ||= requestAnimationFrame(() => {
    frame = 0;
    renderReply(el, reply);
    $("messages").scrollTop = $("messages").scrollHeight;
  }));
  running = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null;
  try {
    const r = await api("/v1/chat/completions", request(c.messages.slice(0, -1), model), running.signal);
    if (models[model]) models[model].loaded = true;
    reply.pending = "waiting for the first token…";
    update();
    for await (const chunk of events(r)) {
      if (chunk.error) throw explain(chunk.error.message, 500, chunk.error.code);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.prompt_progress) reply.progress = chunk.prompt_progress;
      const delta = chunk.choices?.[0]?.delta ?? {};
      if (delta.content || delta.reasoning_content || delta.tool_calls) {
        tFirst ??= performance.now();
        pieces += 1;
        reply.progress = reply.pending = null;
      }
      reply.reasoning += delta.reasoning_content ?? "";
      reply.content += delta.content ?? "";
      addCalls(reply, delta.tool_calls ?? []);
      update();
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = { title: e.title ?? "Something went wrong", message: e.message };
  } finally {
    cancelAnimationFrame(frame);
    reply.progress = reply.pending = null;
    reply.done = true;
    reply.stats = numbers(reply, usage, t0, tFirst, performance.now(), pieces);
    running = null;
    setBusy(false);
    save();
    renderReply(el, reply);
    renderList();
  }
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("model").disabled = busy;
}

// -- wiring --------------------------------------------------------------------------------------------------
const fields = {
  system: "value", temperature: "value", "max-tokens": "value", thinking: "checked", schema: "value", tools: "value",
};
const key = (id) => id.replace(/-(\w)/g, (_, ch) => ch.toUpperCase());
for (const [id, prop] of Object.entries(fields)) {
  $(id)[prop] = settings[key(id)];
  $(id).addEventListener("input", () => {
    settings[key(id)] = $(id)[prop];
    save();
  });
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if ((!text && !attached.length) || running) return;
  $("prompt").value = "";
  const media = attached;
  attached = [];
  showAttached("");
  send(text, media);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running?.abort()); // the server sees the client go and cancels
$("new-chat").addEventListener("click", () => running || newConversation());
$("model").addEventListener("change", () => pick($("model").value));
$("toggle-settings").addEventListener("click", () => ($("settings").hidden = !$("settings").hidden));
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));

// -- images and audio ----------------------------------------------------------------------------------------
const AUDIO = { wav: "wav", wave: "wav", "x-wav": "wav", mpeg: "mp3", mp3: "mp3", flac: "flac", "x-flac": "flac" };
const BY_NAME = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp",
  bmp: "image/bmp", wav: "audio/wav", mp3: "audio/mpeg", flac: "audio/flac" }; // a file the browser did not type
let attached = []; // {kind: "image" | "audio", name, url (a data URL), format (audio)}: goes with the next message

const takes = () => (models[$("model").value]?.modalities ?? ["text"]).filter((k) => k === "image" || k === "audio");

function showAttach() {
  const kinds = takes();
  $("attach").hidden = !kinds.length;
  $("file").accept = kinds.map((k) => `${k}/*`).join(",");
  const kept = attached.filter((x) => kinds.includes(x.kind));
  const note = kept.length < attached.length ? "This model does not take the files removed." : "";
  attached = kept;
  showAttached(note);
}

function showAttached(note) {
  const box = $("attachments");
  box.replaceChildren(mediaRow(attached, (i) => {
    attached.splice(i, 1);
    showAttached("");
  }));
  if (note) box.append(element("div", "notice", note));
  box.hidden = !attached.length && !note;
}

function readURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  const kinds = takes(), notes = [];
  for (const file of files) {
    const type = file.type || BY_NAME[/\.(\w+)$/.exec(file.name)?.[1].toLowerCase()] || "";
    const [kind, sub] = type.split("/");
    if (!kinds.length) notes.push(`${file.name}: this model reads text only.`);
    else if (!kinds.includes(kind)) notes.push(`${file.name}: this model takes ${kinds.join(" and ")} only.`);
    else if (kind === "audio" && !AUDIO[sub]) notes.push(`${file.name}: audio must be WAV, MP3 or FLAC.`);
    else {
      const url = (await readURL(file)).replace(/^data:[^;,]*/, `data:${type}`);
      attached.push({ kind, name: file.name, url, ...(kind === "audio" ? { format: AUDIO[sub] } : {}) });
    }
  }
  showAttached(notes.join(" "));
}

const hasFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes("Files");
$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", async () => {
  await attach([...$("file").files]);
  $("file").value = "";
});
$("prompt").addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files ?? [])];
  if (!files.length) return; // text: pasted as usual
  e.preventDefault();
  attach(files);
});
document.addEventListener("dragover", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  document.body.classList.add("dropping");
});
document.addEventListener("dragleave", (e) => e.relatedTarget || document.body.classList.remove("dropping"));
document.addEventListener("drop", (e) => {
  document.body.classList.remove("dropping");
  if (!hasFiles(e)) return;
  e.preventDefault();
  attach([...e.dataTransfer.files]);
});

// A reply that was streaming when the page went away ends here, as stopped.
for (const m of conversations.flatMap((c) => c.messages)) {
  if (m.role === "assistant" && !m.done) {
    Object.assign(m, { done: true, pending: null, progress: null, stats: `${m.model} · stopped` });
  }
}
if (!conversation()) current = conversations[0]?.id ?? null;
render();
loadModels().catch((e) => setStatus("failed", `${e.title ?? "Error"}: ${e.message}`));

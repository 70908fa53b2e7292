// The page: conversations, attachments with the model's-eye preview, streaming answers, settings.
import * as api from "./api.js";
import { attachmentView, fillAssistant, messageView } from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  notice: $("notice-model"), list: $("conversation-list"), newConversation: $("new-conversation"),
  persist: $("persist"), messages: $("messages"), composer: $("composer"), attachments: $("attachments"),
  attach: $("attach"), fileInput: $("file-input"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  regenerate: $("regenerate"), dropOverlay: $("drop-overlay"), model: $("model"), apiKey: $("api-key"),
  apiKeyHelp: $("api-key-help"), systemPrompt: $("system-prompt"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), seed: $("seed"), ctPreset: $("ct-preset"), showThinking: $("show-thinking"),
};

const state = { conversations: [], active: null, pending: [], models: [] };

// ---- models and the "not for clinical use" notice

async function loadModels() {
  try {
    const models = await api.listModels();
    state.models = models.filter((m) => (m.openmedgemma?.kind ?? "chat") === "chat");
    const previous = ui.model.value;
    ui.model.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
    if (state.models.some((m) => m.id === previous)) ui.model.value = previous;
    ui.apiKeyHelp.textContent = "Kept in this tab's memory only.";
    if (!state.models.length) {  // the list fills once the server has loaded its models
      const problem = await api.health();
      if (problem && !problem.startsWith("loading failed")) {
        ui.notice.textContent = "The server is still loading the model...";
        setTimeout(loadModels, 1000);
        return;
      }
      ui.notice.textContent = problem ? `The server has no model: ${problem}` : "The server serves no chat model.";
      return;
    }
    updateNotice();
  } catch (err) {
    if (err.status === 503) {
      ui.notice.textContent = "The server is still loading the model...";
      setTimeout(loadModels, 2000);
    } else if (err.status === 401) {
      ui.notice.textContent = "This server needs an API key: enter it in Settings.";
      ui.apiKeyHelp.textContent = ui.apiKey.value ? `The server refused this key: ${err.message}` : "Required by this server.";
      ui.apiKey.focus();
    } else {
      ui.notice.textContent = `Cannot list the models: ${err.message}`;
    }
  }
}

function updateNotice() {
  const model = state.models.find((m) => m.id === ui.model.value);
  if (!model) return;
  if (model.openmedgemma?.bundled_nano) {
    ui.notice.textContent = `${model.id} is a tiny demonstration model bundled with openmedgemma: `
      + "its answers are not medically meaningful.";
  } else {
    ui.notice.textContent = `Answers come from ${model.id}, a research model: they can be wrong and `
      + "must not guide diagnosis or treatment.";
  }
}

// ---- conversations

function select(conversation) {
  state.active = conversation;
  renderConversations();
  renderMessages();
}

function renderConversations() {
  ui.list.replaceChildren(...state.conversations.map((conversation) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = store.titleOf(conversation);
    if (conversation === state.active) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => select(conversation));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Delete conversation: ${store.titleOf(conversation)}`);
    remove.addEventListener("click", () => deleteConversation(conversation));
    item.append(open, remove);
    return item;
  }));
}

function deleteConversation(conversation) {
  conversation.controller?.abort();
  state.conversations = state.conversations.filter((c) => c !== conversation);
  if (!state.conversations.length) state.conversations.push(store.newConversation());
  if (state.active === conversation) state.active = state.conversations[0];
  select(state.active);
  persist();
}

function renderMessages() {
  ui.messages.replaceChildren(...state.active.messages.map((message) => {
    message.view = messageView(message);
    return message.view;
  }));
  ui.messages.scrollTop = ui.messages.scrollHeight;
  updateButtons();
}

function updateButtons() {
  const conversation = state.active;
  const last = conversation.messages.at(-1);
  const busy = Boolean(conversation.controller);
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.regenerate.disabled = busy || !last || last.role !== "assistant";
}

function persist() {
  if (!ui.persist.checked) return;
  const problem = store.save(state.conversations);
  if (problem) ui.persist.parentElement.title = problem;
}

// ---- attachments

const MAGIC = [
  [[0x89, 0x50, 0x4e, 0x47], 0, "image/png"],
  [[0xff, 0xd8, 0xff], 0, "image/jpeg"],
  [[0x50, 0x4b, 0x03, 0x04], 0, "application/zip"],
  [[0x50, 0x4b, 0x05, 0x06], 0, "application/zip"],
  [[0x44, 0x49, 0x43, 0x4d], 128, "application/dicom"],  // "DICM" after the preamble
];

// The MIME type the server needs, from the content: browsers give DICOM files no type at all.
async function mimeOf(file) {
  const head = new Uint8Array(await file.slice(0, 132).arrayBuffer());
  for (const [bytes, offset, mime] of MAGIC) {
    if (bytes.every((b, i) => head[offset + i] === b)) return mime;
  }
  if (/\.(dcm|dicom)$/i.test(file.name) || !file.type) return "application/dicom";  // raw DICOM has no magic
  return file.type;
}

async function readDataUrl(file) {
  const mime = await mimeOf(file);
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  return `data:${mime};base64,${url.slice(url.indexOf(",") + 1)}`;
}

function attach(files) {
  for (const file of files) {
    const attachment = { name: file.name, url: null, preview: null, previewing: true, error: null };
    attachment.ready = readDataUrl(file).then((url) => {
      attachment.url = url;
      return refreshPreview(attachment);
    }, (err) => {
      attachment.previewing = false;
      attachment.error = `${file.name}: cannot read the file (${err.message})`;
      renderPending();
    });
    state.pending.push(attachment);
  }
  renderPending();
}

async function refreshPreview(attachment) {
  const request = {};
  attachment.request = request;  // a newer preset choice wins over an older answer
  attachment.previewing = true;
  attachment.error = null;
  renderPending();
  try {
    const preset = ui.ctPreset.value;
    const preview = await api.preview(attachment.url, preset);
    if (attachment.request !== request) return;
    attachment.preview = { ...preview, preset };
  } catch (err) {
    if (attachment.request !== request) return;
    attachment.preview = null;
    attachment.error = err.message;
  }
  attachment.previewing = false;
  renderPending();
}

function renderPending() {
  ui.attachments.replaceChildren(...state.pending.map((attachment) => attachmentView(attachment, () => {
    state.pending = state.pending.filter((a) => a !== attachment);
    renderPending();
  })));
}

// ---- asking

function settings() {
  const temperature = parseFloat(ui.temperature.value);
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  const seed = parseInt(ui.seed.value, 10);
  return { model: ui.model.value, system: ui.systemPrompt.value.trim(), temperature, maxTokens, seed,
    ctPreset: ui.ctPreset.value };
}

function userContent(message) {
  const parts = message.attachments.filter((a) => a.url).map((a) => ({ type: "image_url", image_url: { url: a.url } }));
  if (!parts.length) return [{ type: "text", text: message.text }];
  if (message.text) parts.push({ type: "text", text: message.text });
  return parts;
}

// The OpenAI request for the whole conversation so far. An exchange whose answer failed (a corrupt
// image, a prompt over the context...) is left out, or every later question would fail the same way;
// Regenerate, right after it, retries it. A stopped empty answer leaves two user turns in a row:
// they are merged, since Gemma's chat format alternates user and model turns.
function buildRequest(conversation, s) {
  const messages = s.system ? [{ role: "system", content: s.system }] : [];
  const turns = conversation.messages;
  for (const [index, message] of turns.entries()) {
    if (message.role === "user" && turns[index + 1]?.state === "error") continue;
    const previous = messages.at(-1);
    if (message.role === "user") {
      if (previous?.role === "user") previous.content.push(...userContent(message));
      else messages.push({ role: "user", content: userContent(message) });
    } else if (message.text && message.state !== "error") {
      messages.push({ role: "assistant", content: message.text });
    }
  }
  const request = { messages, ct_preset: s.ctPreset };
  if (s.model) request.model = s.model;
  if (Number.isFinite(s.temperature)) request.temperature = s.temperature;
  if (Number.isFinite(s.maxTokens)) request.max_tokens = s.maxTokens;
  if (Number.isFinite(s.seed)) request.seed = s.seed;
  return request;
}

async function send() {
  const conversation = state.active;
  const text = ui.prompt.value.trim();
  if (conversation.controller || (!text && !state.pending.length)) return;
  const attachments = state.pending;
  state.pending = [];
  ui.prompt.value = "";
  renderPending();
  conversation.messages.push({ role: "user", text, attachments });
  conversation.controller = new AbortController();  // busy from now: one answer at a time
  renderConversations();
  renderMessages();
  await Promise.all(attachments.map((a) => a.ready));  // files still being read or previewed
  await answer(conversation);
}

async function answer(conversation) {
  const s = settings();
  const request = buildRequest(conversation, s);
  const message = { role: "assistant", text: "", reasoning: "", state: "streaming", chunks: 0, model: s.model };
  conversation.messages.push(message);
  conversation.controller ??= new AbortController();
  if (conversation === state.active) renderMessages();
  try {
    for await (const delta of api.streamChat(request, conversation.controller.signal)) {
      if (delta.content) message.text += delta.content;
      if (delta.reasoning_content) message.reasoning += delta.reasoning_content;
      if (delta.finish_reason) message.finish = delta.finish_reason;
      if (delta.content || delta.reasoning_content) message.chunks += 1;
      scheduleRender(message);
    }
    message.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      message.state = "stopped";
    } else {
      message.state = "error";
      message.error = err.message;
    }
  }
  conversation.controller = null;
  showMessage(message);
  if (conversation === state.active) updateButtons();
  persist();
}

// Streaming re-renders at most once a frame, however fast the tokens come.
const dirty = new Set();
function scheduleRender(message) {
  if (!dirty.size) {
    requestAnimationFrame(() => {
      for (const pending of dirty) showMessage(pending);
      dirty.clear();
    });
  }
  dirty.add(message);
}

function showMessage(message) {
  if (!message.view?.isConnected) return;
  const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
  fillAssistant(message.view, message);
  if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function regenerate() {
  const conversation = state.active;
  if (conversation.controller || conversation.messages.at(-1)?.role !== "assistant") return;
  conversation.messages.pop();
  conversation.controller = new AbortController();
  answer(conversation);
}

// ---- wiring

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => state.active.controller?.abort());
  ui.regenerate.addEventListener("click", regenerate);
  ui.newConversation.addEventListener("click", () => {
    const conversation = store.newConversation();
    state.conversations.unshift(conversation);
    select(conversation);
    ui.prompt.focus();
  });
  ui.attach.addEventListener("click", () => ui.fileInput.click());
  ui.fileInput.addEventListener("change", () => {
    attach([...ui.fileInput.files]);
    ui.fileInput.value = "";
  });
  ui.ctPreset.addEventListener("change", () => state.pending.forEach((a) => a.url && refreshPreview(a)));
  ui.model.addEventListener("change", updateNotice);
  ui.apiKey.addEventListener("change", () => {
    api.setApiKey(ui.apiKey.value);
    loadModels();
  });
  ui.apiKey.addEventListener("keydown", (event) => {
    if (event.key === "Enter") ui.apiKey.dispatchEvent(new Event("change"));
  });
  ui.showThinking.addEventListener("change", () => {
    document.body.classList.toggle("show-thinking", ui.showThinking.checked);
  });
  ui.persist.addEventListener("change", () => {
    if (ui.persist.checked) persist();
    else store.disablePersistence();
  });
  // Drag and drop anywhere on the page.
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    ui.dropOverlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) ui.dropOverlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    ui.dropOverlay.hidden = true;
    if (event.dataTransfer?.files.length) attach([...event.dataTransfer.files]);
  });
}

function start() {
  wire();
  if (store.persistenceEnabled()) {
    ui.persist.checked = true;
    state.conversations = store.load();
  }
  if (!state.conversations.length) state.conversations.push(store.newConversation());
  select(state.conversations[0]);
  loadModels();
  document.body.dataset.ready = "true";
}

// A bug must show as a message, never as a silently dead page.
function showPageError(message) {
  ui.notice.textContent = `Page error: ${message} (reload the page)`;
}
window.addEventListener("error", (event) => showPageError(event.message));
window.addEventListener("unhandledrejection", (event) => showPageError(String(event.reason?.message || event.reason)));

start();

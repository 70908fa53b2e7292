// Turning messages into DOM. Model output is Markdown -> HTML -> DOMPurify; everything else a user
// or a server supplies (their text, file names, error messages) goes in as text, never as HTML.
/* global marked, DOMPurify */

// Elements a chat answer has no use for: images and embeds would make the browser fetch URLs
// chosen by the model (the CSP blocks them too); forms, styles, classes and ids could imitate or
// restyle the page's own controls and notices.
const FORBID_TAGS = ["img", "picture", "video", "audio", "source", "iframe", "object", "embed",
  "form", "input", "button", "textarea", "select", "style", "link", "meta", "base", "svg", "math"];

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function markdownToSafeHtml(text) {
  const html = marked.parse(text, { gfm: true, breaks: true, async: false });
  return DOMPurify.sanitize(html, { FORBID_TAGS, FORBID_ATTR: ["style", "class", "id"] });
}

const renderedSource = new WeakMap();  // node -> the Markdown it shows, to skip unchanged parts

function setMarkdown(node, text) {
  if (renderedSource.get(node) === text) return;
  renderedSource.set(node, text);
  node.innerHTML = markdownToSafeHtml(text || "");
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One attachment: its file name (as text), what the model sees, and its state or error.
export function attachmentView(attachment, onRemove) {
  const box = element("figure", "attachment");
  const image = element("img", "preview");
  image.alt = `What the model sees for ${attachment.name}`;
  image.hidden = !attachment.preview;
  if (attachment.preview) {
    image.src = attachment.preview.png;
    image.dataset.preset = attachment.preview.preset;  // the CT preset it was rendered with
  }
  image.addEventListener("click", () => image.classList.toggle("expanded"));
  box.append(image);
  const caption = element("figcaption");
  caption.append(element("span", "file-name", attachment.name));
  let status;
  if (attachment.error) status = element("span", "error", attachment.error);
  else if (attachment.previewing) status = element("span", "status", "rendering what the model will see...");
  else if (attachment.preview) status = element("span", "status", attachment.preview.caption);
  else if (!attachment.url) status = element("span", "status", "image not kept in browser storage");
  if (status) {
    if (attachment.error) status.setAttribute("role", "alert");
    caption.append(status);
  }
  if (onRemove) {
    const remove = element("button", "remove", "\u00d7");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${attachment.name}`);
    remove.addEventListener("click", onRemove);
    caption.append(remove);
  }
  box.append(caption);
  return box;
}

export function messageView(message) {
  const box = element("article", `message ${message.role}`);
  box.dataset.role = message.role;
  box.setAttribute("aria-label", message.role === "user" ? "You" : "Model");
  if (message.role === "user") {
    if (message.attachments.length) {
      const list = element("div", "attachments");
      for (const attachment of message.attachments) list.append(attachmentView(attachment));
      box.append(list);
    }
    box.append(element("div", "text", message.text));
    return box;
  }
  fillAssistant(box, message);
  return box;
}

// (Re)fills an assistant message in place while it streams: the thinking block keeps its
// open/closed state, and only the parts that changed are re-parsed.
export function fillAssistant(box, message) {
  box.dataset.state = message.state;
  box.setAttribute("aria-busy", String(message.state === "streaming"));  // screen readers wait for the end
  box.dataset.chunks = String(message.chunks || 0);
  let thinking = box.querySelector(".thinking");
  if (message.reasoning && !thinking) {
    thinking = element("details", "thinking");
    thinking.append(element("summary", "", "Thinking"), element("div", "markdown"));
    box.prepend(thinking);
  }
  if (thinking) setMarkdown(thinking.querySelector(".markdown"), message.reasoning);
  let answer = box.querySelector(".answer");
  if (!answer) box.append(answer = element("div", "markdown answer"));
  setMarkdown(answer, message.text);
  box.querySelector(":scope > .meta")?.remove();
  box.querySelector(":scope > .error")?.remove();
  if (message.error) {
    const error = element("p", "error", message.error);
    error.setAttribute("role", "alert");
    box.append(error);
  }
  const footer = element("div", "meta");
  if (message.state === "streaming") footer.textContent = "answering...";
  else if (message.state === "stopped") footer.textContent = "stopped";
  else if (message.state === "done" && message.finish === "length") footer.textContent = "cut at max tokens";
  else if (message.state === "error") footer.textContent = "this exchange is left out of the conversation";
  if (message.model) footer.append(element("span", "model-name", ` ${message.model}`));
  box.append(footer);
}

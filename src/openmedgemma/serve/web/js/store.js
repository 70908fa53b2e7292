// Conversations of this tab. They live in memory only; the user may opt in to keep their text in
// the browser's localStorage (images never: they may identify a patient and are large).

const STORAGE_KEY = "openmedgemma.conversations";

let nextId = 1;

export function newConversation() {
  return { id: nextId++, title: "New conversation", messages: [], controller: null };
}

export function titleOf(conversation) {
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New conversation";
  const text = first.text.trim() || first.attachments.map((a) => a.name).join(", ") || "Images";
  return text.length > 40 ? `${text.slice(0, 40)}...` : text;
}

export function persistenceEnabled() {
  return localStorage.getItem(STORAGE_KEY) !== null;
}

export function disablePersistence() {
  localStorage.removeItem(STORAGE_KEY);
}

// Text, file names and answers only; an attachment comes back without its image.
export function save(conversations) {
  const kept = conversations.map((c) => ({
    messages: c.messages.filter((m) => m.state !== "streaming").map((m) => ({
      role: m.role, text: m.text, reasoning: m.reasoning, state: m.state, finish: m.finish,
      model: m.model, error: m.error,
      attachments: (m.attachments || []).map((a) => ({ name: a.name })),
    })),
  }));
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(kept));
    return null;
  } catch (err) {
    return `could not keep the history in the browser (${err.message})`;
  }
}

export function load() {
  let kept;
  try {
    kept = JSON.parse(localStorage.getItem(STORAGE_KEY) || "[]");
  } catch {
    return [];
  }
  if (!Array.isArray(kept)) return [];
  return kept.map((c) => {
    const conversation = newConversation();
    conversation.messages = (c.messages || []).map((m) => ({
      role: m.role === "user" ? "user" : "assistant",
      text: String(m.text || ""), reasoning: m.reasoning ? String(m.reasoning) : "",
      state: m.state || "done", finish: m.finish, model: m.model, error: m.error,
      attachments: (m.attachments || []).map((a) => ({ name: String(a.name), url: null, preview: null })),
    }));
    return conversation;
  });
}

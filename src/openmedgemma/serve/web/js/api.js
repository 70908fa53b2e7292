// Talking to the server: the OpenAI endpoints and the /v1/preview extension.
// URLs are relative, so the page also works behind a reverse proxy under a path prefix.

let apiKey = "";  // in this tab's memory only, never stored

export function setApiKey(key) {
  apiKey = key.trim();
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

// An OpenAI-shaped error body ({"error": {"message"}}) or anything else -> one readable line.
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && typeof body.detail === "string") message = body.detail;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " (enter the server's API key in Settings)";
  return new ApiError(message, response.status);
}

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers() });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${err.message})`, 0);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function listModels() {
  const body = await (await call("v1/models")).json();
  return body.data || [];
}

// GET /health (no key needed): null when ready, else the server's reason (loading, or why loading failed).
export async function health() {
  try {
    await call("health");
    return null;
  } catch (err) {
    return err.message;
  }
}

export async function preview(imageUrl, ctPreset) {
  const body = JSON.stringify({ image_url: imageUrl, ct_preset: ctPreset });
  return (await call("v1/preview", { method: "POST", body })).json();
}

// Streams a chat completion: yields each chunk's delta ({content, reasoning_content}) as it
// arrives. Aborting `signal` closes the connection, which cancels the sequence on the server.
export async function* streamChat(request, signal) {
  const body = JSON.stringify({ ...request, stream: true });
  const response = await call("v1/chat/completions", { method: "POST", body, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let value, done;
    try {
      ({ value, done } = await reader.read());
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`the connection to the server broke mid-answer (${err.message})`, 0);
    }
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "the server stopped the answer", 500);
      for (const choice of chunk.choices || []) {
        yield { ...choice.delta, finish_reason: choice.finish_reason };
      }
    }
  }
}

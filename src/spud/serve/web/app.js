// Spud chat page: plain JS, no build step, no network access beyond this server's own API.
//
// Safety rule for rendering: model output is always HTML-escaped *before* the small markdown
// subset below adds its own fixed tags, and user text / errors only ever go through textContent.
"use strict";

(function () {
  const API_CHAT = "v1/chat/completions"; // relative: works whatever prefix the page is served under
  const API_MODELS = "v1/models";
  const KEY_CONVS = "spud.conversations";
  const KEY_CURRENT = "spud.current";
  const KEY_SETTINGS = "spud.settings";
  // max_tokens null = "auto": not sent, so the server uses whatever context the prompt leaves
  // (a fixed default fails outright on small-context models).
  const DEFAULTS = { system: "", temperature: 0.8, max_tokens: null, api_key: "" };

  const $ = (id) => document.getElementById(id);
  const el = {
    messages: $("messages"), empty: $("empty"), banner: $("banner"), composer: $("composer"),
    prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    list: $("conversations"), system: $("system"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), apiKey: $("api-key"), modelName: $("model-name"),
    attach: $("attach"), attachInput: $("attach-input"), attachments: $("attachments"),
  };
  const images = window.spudImages; // images.js: attach / paste / drop, thumbnails, content parts

  // ------------------------------------------------------------------------------ storage
  function loadJSON(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw ? JSON.parse(raw) : fallback;
    } catch (e) {
      return fallback;
    }
  }
  function storeJSON(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      showBanner("Could not save to this browser's storage: " + e.message);
    }
  }

  let convs = loadJSON(KEY_CONVS, []);
  if (!Array.isArray(convs)) convs = [];
  convs = convs.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
  let currentId = loadJSON(KEY_CURRENT, null);
  let controller = null; // AbortController of the generation in flight, if any
  let modelId = null;
  let lastSave = 0;

  function saveConvs() {
    lastSave = Date.now();
    storeJSON(KEY_CONVS, convs);
    storeJSON(KEY_CURRENT, currentId);
  }
  function currentConv() {
    return convs.find((c) => c.id === currentId) || null;
  }
  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // ----------------------------------------------------------------------------- settings
  function readSettings() {
    const t = parseFloat(el.temperature.value);
    const m = parseInt(el.maxTokens.value, 10);
    return {
      system: el.system.value,
      temperature: Number.isFinite(t) && t >= 0 ? t : DEFAULTS.temperature,
      max_tokens: Number.isFinite(m) && m > 0 ? m : DEFAULTS.max_tokens,
      api_key: el.apiKey.value.trim(),
    };
  }
  function loadSettings() {
    const s = Object.assign({}, DEFAULTS, loadJSON(KEY_SETTINGS, {}));
    el.system.value = s.system || "";
    el.temperature.value = String(s.temperature);
    el.maxTokens.value = s.max_tokens == null ? "" : String(s.max_tokens);
    el.apiKey.value = s.api_key || "";
  }
  function saveSettings() {
    const s = readSettings();
    storeJSON(KEY_SETTINGS, {
      system: el.system.value, temperature: el.temperature.value === "" ? DEFAULTS.temperature : s.temperature,
      max_tokens: el.maxTokens.value === "" ? DEFAULTS.max_tokens : s.max_tokens, api_key: s.api_key,
    });
  }
  function headers() {
    const h = { "Content-Type": "application/json", Accept: "text/event-stream, application/json" };
    const key = readSettings().api_key;
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ----------------------------------------------------------------------------- markdown
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // `escaped` is already HTML-escaped; only fixed tags are added around its pieces.
  function renderInline(escaped) {
    const codes = [];
    let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
      codes.push("<code>" + code + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/\n/g, "<br>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
  }

  function renderParagraphs(text) {
    return text.split(/\n[ \t]*\n+/)
      .map((p) => p.replace(/^\n+|\n+$/g, ""))
      .filter((p) => p.trim() !== "")
      .map((p) => "<p>" + renderInline(escapeHtml(p)) + "</p>")
      .join("");
  }

  // Fenced code blocks (an unclosed fence, as mid-stream, runs to the end), inline code,
  // **bold** / __bold__, *italics* / _italics_, paragraphs and line breaks. Nothing else.
  function renderMarkdown(raw) {
    const text = String(raw).replace(/\u0000/g, "");
    const fence = /(^|\n)[ \t]*```([^\n`]*)(?:\n|$)([\s\S]*?)(?:\n[ \t]*```[ \t]*(?=\n|$)|$)/g;
    let out = "";
    let last = 0;
    let m;
    while ((m = fence.exec(text)) !== null) {
      out += renderParagraphs(text.slice(last, m.index));
      const lang = m[2].trim().replace(/[^\w+#.-]/g, "");
      const cls = lang ? ' class="language-' + escapeHtml(lang) + '"' : "";
      out += "<pre><code" + cls + ">" + escapeHtml(m[3]) + "</code></pre>";
      last = fence.lastIndex;
      if (m[0] === "") fence.lastIndex++; // never loop on an empty match
    }
    out += renderParagraphs(text.slice(last));
    return out;
  }

  // ------------------------------------------------------------------------------ UI bits
  function showBanner(text) {
    el.banner.textContent = text;
    el.banner.hidden = false;
  }
  function hideBanner() {
    el.banner.hidden = true;
    el.banner.textContent = "";
  }
  function setBusy(busy) {
    el.send.hidden = busy;
    el.send.disabled = busy;
    el.stop.hidden = !busy;
    el.stop.disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }
  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }
  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  const WHO = { user: "You", assistant: "Spud", error: "Error" };

  function fillBody(body, msg) {
    if (msg.role === "assistant") {
      body.innerHTML = renderMarkdown(msg.content); // escaped inside renderMarkdown
      if (msg.note) {
        const note = document.createElement("div");
        note.className = "note";
        note.textContent = msg.note;
        body.appendChild(note);
      }
    } else {
      body.textContent = msg.content;
      if (msg.images) images.show(body, msg.images, msg.imagesRefused);
    }
  }

  function messageElement(msg) {
    const div = document.createElement("div");
    div.className = "msg " + msg.role;
    div.dataset.role = msg.role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = WHO[msg.role] || msg.role;
    const body = document.createElement("div");
    body.className = "body";
    fillBody(body, msg);
    div.append(who, body);
    return div;
  }

  function renderMessages() {
    const conv = currentConv();
    el.messages.replaceChildren();
    const msgs = conv ? conv.messages : [];
    if (!msgs.length) el.messages.appendChild(el.empty);
    for (const msg of msgs) el.messages.appendChild(messageElement(msg));
    scrollToBottom();
  }

  function renderList() {
    el.list.replaceChildren();
    const sorted = convs.slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
    for (const c of sorted) {
      const item = document.createElement("div");
      item.className = "conv" + (c.id === currentId ? " active" : "");
      item.dataset.id = c.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "conv-title";
      open.textContent = c.title || "Untitled";
      open.title = c.title || "";
      open.addEventListener("click", () => openConv(c.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "conv-delete";
      del.textContent = "\u00d7";
      del.title = "Delete this conversation";
      del.setAttribute("aria-label", "Delete conversation");
      del.addEventListener("click", () => deleteConv(c.id));
      item.append(open, del);
      el.list.appendChild(item);
    }
  }

  function renderAll() {
    renderList();
    renderMessages();
  }

  function stopGeneration() {
    if (controller) controller.abort();
  }
  function openConv(id) {
    stopGeneration();
    currentId = id;
    hideBanner();
    saveConvs();
    renderAll();
    el.prompt.focus();
  }
  function newChat() {
    stopGeneration();
    currentId = null;
    hideBanner();
    saveConvs();
    renderAll();
    el.prompt.focus();
  }
  function deleteConv(id) {
    if (id === currentId) stopGeneration();
    convs = convs.filter((c) => c.id !== id);
    if (id === currentId) currentId = null;
    saveConvs();
    renderAll();
  }

  // --------------------------------------------------------------------------------- API
  // `info`, when given, receives the error's OpenAI `code`.
  async function errorMessage(resp, info) {
    let text = "";
    try {
      text = await resp.text();
    } catch (e) { /* body unreadable: fall through to the status line */ }
    let detail = "";
    try {
      const j = JSON.parse(text);
      if (info && j && j.error) info.code = j.error.code;
      if (j && j.error && typeof j.error.message === "string") detail = j.error.message;
      else if (j && typeof j.error === "string") detail = j.error;
      else if (j && typeof j.detail === "string") detail = j.detail;
      else if (j && j.detail !== undefined) detail = JSON.stringify(j.detail);
    } catch (e) {
      detail = text.trim().slice(0, 300);
    }
    const status = "HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : "");
    return detail ? status + ": " + detail : status;
  }

  class StreamError extends Error {}

  // Reads an OpenAI-style SSE stream; calls onDelta(text) per content piece.
  // Returns {done: saw [DONE], finish: last finish_reason}.
  async function readStream(resp, onDelta) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    const state = { done: false, finish: null };
    const handle = (event) => {
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) return; // comment / keep-alive / other fields
      if (data.trim() === "[DONE]") {
        state.done = true;
        return;
      }
      let obj;
      try {
        obj = JSON.parse(data);
      } catch (e) {
        throw new StreamError("The server sent a malformed stream chunk: " + data.slice(0, 120));
      }
      if (obj && obj.error) {
        throw new StreamError((obj.error && obj.error.message) || String(obj.error));
      }
      const choice = obj && obj.choices && obj.choices[0];
      if (!choice) return;
      const piece = choice.delta && choice.delta.content;
      if (typeof piece === "string" && piece) onDelta(piece);
      if (choice.finish_reason) state.finish = choice.finish_reason;
    };
    try {
      while (!state.done) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while (!state.done && (i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          handle(event);
        }
      }
      buf += decoder.decode();
      if (!state.done && buf.trim()) handle(buf);
    } finally {
      reader.cancel().catch(() => {});
    }
    return state;
  }

  async function send() {
    const text = el.prompt.value.trim();
    if ((!text && !images.count()) || controller) return;
    hideBanner();
    let conv = currentConv();
    if (!conv) {
      const title = text.replace(/\s+/g, " ").slice(0, 60) || "Image";
      conv = { id: newId(), title: title, messages: [], updated: Date.now() };
      convs.push(conv);
      currentId = conv.id;
    }
    const sent = { role: "user", content: text };
    const pics = images.take();
    if (pics.length) sent.images = pics;
    const history = conv.messages.concat([sent])
      .filter((m) => (m.role === "user" || m.role === "assistant") && images.content(m))
      .map((m) => ({ role: m.role, content: images.content(m) }));
    const settings = readSettings();
    if (settings.system.trim()) history.unshift({ role: "system", content: settings.system });

    conv.messages.push(sent);
    const reply = { role: "assistant", content: "" };
    conv.messages.push(reply);
    conv.updated = Date.now();
    el.prompt.value = "";
    saveConvs();
    renderAll();
    const replyEl = el.messages.lastElementChild;
    replyEl.classList.add("streaming");
    const body = replyEl.querySelector(".body");

    const ctrl = new AbortController();
    controller = ctrl;
    setBusy(true);
    let error = null;
    try {
      const resp = await fetch(API_CHAT, {
        method: "POST", headers: headers(), signal: ctrl.signal,
        body: JSON.stringify({
          model: modelId || "spud", messages: history, stream: true,
          temperature: settings.temperature,
          ...(settings.max_tokens == null ? {} : { max_tokens: settings.max_tokens }),
        }),
      });
      if (!resp.ok) {
        const info = {};
        const err = new StreamError(await errorMessage(resp, info));
        // a refused image must not be sent again with every later message of this chat
        if (sent.images && images.refused(info.code)) sent.imagesRefused = true;
        throw err;
      }
      if (!resp.body) throw new StreamError("The server's reply has no body to stream.");
      const state = await readStream(resp, (piece) => {
        const follow = nearBottom();
        reply.content += piece;
        fillBody(body, reply);
        if (follow) scrollToBottom();
        if (Date.now() - lastSave > 1000) saveConvs();
      });
      if (state.finish === "length") reply.note = "(stopped: max tokens reached)";
      else if (!state.done && !state.finish) {
        throw new StreamError("The connection closed before the reply finished.");
      }
    } catch (e) {
      if (ctrl.signal.aborted) reply.note = "(stopped)";
      else if (e instanceof StreamError) error = e.message;
      else error = "Network error: could not reach the server (" + (e && e.message ? e.message : e) + ")";
    } finally {
      if (controller === ctrl) controller = null;
      if (error && !reply.content) conv.messages.splice(conv.messages.indexOf(reply), 1);
      else if (!reply.content && !reply.note) reply.note = "(empty reply)";
      // A failed reply is shown once, where it happened: inline in the conversation (and kept
      // with it). The banner is only for problems not tied to a message (API key, server down).
      if (error) conv.messages.push({ role: "error", content: error });
      conv.updated = Date.now();
      saveConvs();
      setBusy(false);
      renderAll();
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch(API_MODELS, { headers: headers() });
      if (!resp.ok) {
        el.modelName.textContent = "";
        if (resp.status === 401) showBanner((await errorMessage(resp)) + " (set the API key in Settings)");
        return;
      }
      const j = await resp.json();
      const first = j && Array.isArray(j.data) && j.data[0];
      if (first && typeof first.id === "string") {
        modelId = first.id;
        el.modelName.textContent = first.id;
      }
    } catch (e) {
      el.modelName.textContent = "(offline)";
    }
  }

  // ------------------------------------------------------------------------------ wiring
  el.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    } else if (ev.key === "Escape") {
      stopGeneration();
    }
  });
  document.getElementById("settings-form").addEventListener("submit", (ev) => ev.preventDefault());
  el.stop.addEventListener("click", stopGeneration);
  images.init({
    button: el.attach, input: el.attachInput, box: el.attachments, dropZone: $("main"), onError: showBanner,
  });
  el.newChat.addEventListener("click", newChat);
  for (const input of [el.system, el.temperature, el.maxTokens, el.apiKey]) {
    input.addEventListener("input", saveSettings);
  }
  el.apiKey.addEventListener("change", () => {
    hideBanner();
    loadModel();
  });

  loadSettings();
  if (!currentConv()) currentId = null;
  setBusy(false);
  renderAll();
  loadModel();
  window.spudChat = { renderMarkdown }; // for tests and the curious
})();

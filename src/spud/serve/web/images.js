// Spud chat page: images in the composer (attach, paste, drop) and in the conversation.
//
// An attached image becomes a data URL (the server is offline and fetches no remote URL) that is
// sent as an OpenAI content part {"type": "image_url", "image_url": {"url": ...}} before the
// message's text, the order the vision stages train on. Images up to KEEP_BYTES are sent byte
// for byte; bigger ones are downscaled here first (longest side MAX_SIDE): the model sees a small
// image anyway, and the conversation, images included, is saved in this browser's storage.
// Image sources on the page are only ever data:image/ URLs made here, set as img.src (no HTML).
"use strict";

window.spudImages = (function () {
  const TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
  const MAX_IMAGES = 16; // per request, as the server allows
  const KEEP_BYTES = 1 << 20;
  const MAX_SIDE = 1536;
  // the server's error codes for an image it will not take (serve/images.py)
  const REFUSALS = ["images_not_supported", "invalid_image_url", "invalid_image", "invalid_image_format",
    "image_too_large", "too_many_images"];
  let pending = []; // data URLs waiting in the composer
  let box = null; // the composer's thumbnail strip
  let onError = () => {};
  let onChange = () => {};

  function readDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(String(r.result));
      r.onerror = () => reject(new Error("could not read " + (file.name || "the image")));
      r.readAsDataURL(file);
    });
  }

  function decode(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser cannot decode this image"));
      img.src = url;
    });
  }

  async function toDataURL(file) {
    const url = await readDataURL(file);
    if (file.size <= KEEP_BYTES) return url;
    const img = await decode(url);
    const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.9);
  }

  function isImageURL(url) {
    return typeof url === "string" && /^data:image\/(png|jpeg|webp|gif)[;,]/.test(url);
  }

  // Files from the picker, a paste or a drop: images are added, anything else is reported.
  async function add(files) {
    const list = Array.from(files || []);
    for (const file of list) {
      const name = file.name || "the pasted file";
      if (!TYPES.includes(file.type)) {
        onError(name + " is not a PNG, JPEG, WebP or GIF image.");
        continue;
      }
      if (pending.length >= MAX_IMAGES) {
        onError("At most " + MAX_IMAGES + " images per message.");
        break;
      }
      try {
        pending.push(await toDataURL(file));
      } catch (e) {
        onError("Could not attach " + name + ": " + e.message);
      }
      renderPending();
    }
  }

  function renderPending() {
    box.replaceChildren();
    pending.forEach((url, i) => {
      const item = document.createElement("div");
      item.className = "thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = "attached image " + (i + 1);
      const del = document.createElement("button");
      del.type = "button";
      del.className = "thumb-remove";
      del.textContent = "\u00d7";
      del.title = "Remove this image";
      del.setAttribute("aria-label", "Remove image " + (i + 1));
      del.addEventListener("click", () => {
        pending.splice(i, 1);
        renderPending();
      });
      item.append(img, del);
      box.appendChild(item);
    });
    box.hidden = pending.length === 0;
    onChange();
  }

  // The images of a stored message, shown above its text (dimmed when the server refused them).
  function show(body, urls, refused) {
    const good = (urls || []).filter(isImageURL);
    if (!good.length) return;
    const gallery = document.createElement("div");
    gallery.className = "gallery" + (refused ? " refused" : "");
    if (refused) gallery.title = "Not sent: the server refused these images";
    for (const url of good) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "image sent with this message";
      gallery.appendChild(img);
    }
    body.prepend(gallery);
  }

  // A stored message → its API content: the string as before, or image parts then the text.
  function content(msg) {
    const urls = msg.imagesRefused ? [] : (msg.images || []).filter(isImageURL);
    if (!urls.length) return msg.content;
    const parts = urls.map((url) => ({ type: "image_url", image_url: { url: url } }));
    if (msg.content) parts.push({ type: "text", text: msg.content });
    return parts;
  }

  function take() {
    const out = pending;
    pending = [];
    renderPending();
    return out;
  }

  function init(opts) {
    box = opts.box;
    onError = opts.onError || onError;
    onChange = opts.onChange || onChange;
    opts.button.addEventListener("click", () => opts.input.click());
    opts.input.addEventListener("change", async () => {
      await add(opts.input.files);
      opts.input.value = ""; // the same file can be picked again
    });
    // paste anywhere on the page: image files are attached, text pastes as usual
    document.addEventListener("paste", (ev) => {
      const files = Array.from((ev.clipboardData && ev.clipboardData.files) || []);
      if (!files.some((f) => f.type.startsWith("image/"))) return;
      ev.preventDefault();
      add(files);
    });
    opts.dropZone.addEventListener("dragover", (ev) => {
      if (ev.dataTransfer && Array.from(ev.dataTransfer.types).includes("Files")) ev.preventDefault();
    });
    opts.dropZone.addEventListener("drop", (ev) => {
      if (!ev.dataTransfer || !ev.dataTransfer.files.length) return;
      ev.preventDefault();
      add(ev.dataTransfer.files);
    });
    renderPending();
  }

  return {
    init, add, take, show, content, count: () => pending.length, refused: (code) => REFUSALS.includes(code),
  };
})();

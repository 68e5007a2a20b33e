// camretrieval's search page: plain JavaScript over the JSON API (docs/web.md), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("query-canvas");
const ctx = canvas.getContext("2d");

const state = {
  info: null,
  source: null, // {kind: "upload", file, queryId} or {kind: "path", path}
  image: null, // the HTMLImageElement shown on the canvas (null when the browser cannot show the file)
  scale: 1, // query pixels per canvas pixel
  box: null, // [x1, y1, x2, y2] in the query's own pixels
  drag: null, // canvas coordinates while drawing
  last: null, // the last search: {entry, source}
  picker: { q: "", offset: 0, limit: 40, total: 0 },
};

// A file name is any bytes but "/" and NUL. The server names one that is not UTF-8 as Python does (os.fsdecode):
// each of its other bytes as a lone surrogate U+DC80-U+DCFF, which JSON carries as "\udcXX". Such a surrogate is
// sent as the byte it stands for; encodeURIComponent would throw on it (and URLSearchParams replace it).
const encodeName = (text) => {
  let out = "";
  for (const char of text) {
    const code = char.codePointAt(0);
    if (code >= 0xdc80 && code <= 0xdcff) out += "%" + (code - 0xdc00).toString(16).toUpperCase();
    else if (code >= 0xd800 && code <= 0xdfff) out += encodeURIComponent("\ufffd");
    else out += encodeURIComponent(char);
  }
  return out;
};
const hasRawBytes = (text) => [...text].some((char) => char.codePointAt(0) >= 0xdc80 && char.codePointAt(0) <= 0xdcff);
// Each path segment encoded on its own: the slashes stay, anything else in a file name is escaped.
const pathUrl = (prefix, path) => prefix + path.split("/").map(encodeName).join("/");
// A query string whose values may be such names.
const queryString = (params) =>
  Object.entries(params)
    .filter(([, value]) => value !== undefined && value !== null && value !== "")
    .map(([name, value]) => `${encodeURIComponent(name)}=${encodeName(String(value))}`)
    .join("&");

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail;
    const message = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : "";
    throw new Error(message || `${response.status} ${response.statusText}`);
  }
  return body;
}

function setStatus(text, isError = false, element = $("status")) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

// --- the index ---

async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  const s = info.settings;
  $("index-info").textContent = `${info.count} images · ${s.backbone}, ${s.size} px, pooling ${s.pooling}`;
  const r = info.refinement;
  $("refine").disabled = !r.online;
  $("online").disabled = !r.online;
  $("rerank").disabled = !r.rerank;
  $("qe").disabled = !r.qe;
  $("refinement").disabled = !(r.online || r.rerank || r.qe);
  $("refinement-note").textContent = r.online
    ? ""
    : "Online aggregation and re-ranking need an index built with its maps (camretrieval index without --no-maps).";
}

// --- choosing the query ---

function setImage(image, source) {
  state.image = image;
  state.source = source;
  state.box = null;
  fitCanvas();
  draw();
  $("canvas-hint").hidden = Boolean(image);
  $("canvas-hint").textContent = image ? "" : "No preview for this file: it can be searched without a box.";
  $("search-button").disabled = false;
  updateBoxInfo();
}

function fitCanvas() {
  if (!state.image) {
    canvas.width = 400;
    canvas.height = 300;
    state.scale = 1;
    return;
  }
  const maxWidth = Math.max(200, canvas.parentElement.clientWidth || 400);
  const maxHeight = 480;
  const { naturalWidth: w, naturalHeight: h } = state.image;
  const s = Math.min(maxWidth / w, maxHeight / h);
  canvas.width = Math.max(1, Math.round(w * s));
  canvas.height = Math.max(1, Math.round(h * s));
  state.scale = w / canvas.width;
}

function draw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const rect = state.drag || (state.box && state.box.map((v) => v / state.scale));
  if (!rect) return;
  const [x1, y1, x2, y2] = normalised(rect);
  // Dim what lies outside the box: the search only sees the box.
  ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
  ctx.fillRect(0, 0, canvas.width, y1);
  ctx.fillRect(0, y2, canvas.width, canvas.height - y2);
  ctx.fillRect(0, y1, x1, y2 - y1);
  ctx.fillRect(x2, y1, canvas.width - x2, y2 - y1);
  // A dark line under a bright one: the box shows on a white sky as on a black night.
  ctx.strokeStyle = "rgba(0, 0, 0, 0.85)";
  ctx.lineWidth = 4;
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  ctx.strokeStyle = "#ffd400";
  ctx.lineWidth = 2;
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
}

function normalised([x1, y1, x2, y2]) {
  return [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)];
}

function canvasPoint(event) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
}

// One feature cell of the network, in the query's own pixels: the query is resized so that its shorter side is
// network.input_size px, and a cell covers network.stride x network.stride px of that input.
function cellSize() {
  if (!state.info || !state.info.network || !state.image) return null;
  const { input_size: size, stride } = state.info.network;
  const shorter = Math.min(state.image.naturalWidth, state.image.naturalHeight);
  return (stride * shorter) / size;
}

function updateBoxInfo() {
  const box = state.box;
  $("box-info").textContent = box
    ? `Box: ${box.map((v) => Math.round(v)).join(", ")} (x1, y1, x2, y2 in the query's pixels)`
    : "Drag on the image to draw a box around the object (optional).";
  $("clear-box").disabled = !box;
  const cell = cellSize();
  const warning = $("box-warning");
  const small = Boolean(box && cell && (box[2] - box[0] < cell || box[3] - box[1] < cell));
  warning.hidden = !small;
  if (small) {
    const { input_size: size, stride } = state.info.network;
    const side = Math.round(cell);
    warning.textContent =
      `This box is ${Math.round(box[2] - box[0])} × ${Math.round(box[3] - box[1])} px, smaller than one feature ` +
      `cell (${side} × ${side} px of this image: the network sees it at ${size} px on its shorter side, one cell ` +
      `per ${stride} px). The search describes whole cells, so it will see more than the box: draw a larger one.`;
  }
}

canvas.addEventListener("pointerdown", (event) => {
  if (!state.image) return;
  canvas.setPointerCapture(event.pointerId);
  const [x, y] = canvasPoint(event);
  state.drag = [x, y, x, y];
  draw();
});
canvas.addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  const [x, y] = canvasPoint(event);
  state.drag[2] = x;
  state.drag[3] = y;
  draw();
});
function endDrag(event) {
  if (!state.drag) return;
  const [x1, y1, x2, y2] = normalised(state.drag);
  state.drag = null;
  // A click or a tiny drag clears the box instead of making a useless one.
  state.box = x2 - x1 < 4 || y2 - y1 < 4 ? null : [x1, y1, x2, y2].map((v) => Math.round(v * state.scale));
  if (state.box) {
    const { naturalWidth: w, naturalHeight: h } = state.image;
    state.box = [state.box[0], state.box[1], Math.min(state.box[2], w), Math.min(state.box[3], h)];
  }
  draw();
  updateBoxInfo();
}
canvas.addEventListener("pointerup", endDrag);
canvas.addEventListener("pointercancel", endDrag);

$("clear-box").addEventListener("click", () => {
  state.box = null;
  draw();
  updateBoxInfo();
});

// The query as a file: chosen with the file input, dropped on the page, or pasted from the clipboard.
function useFile(file, how = "") {
  const limit = state.info ? state.info.limits.upload_bytes : Infinity;
  if (file.size > limit) {
    setStatus(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB: the limit is ${limit / 2 ** 20} MB`, true);
    return;
  }
  setStatus(how ? `query: ${file.name} (${how})` : "");
  const image = new Image();
  const source = { kind: "upload", file, queryId: null };
  image.onload = () => setImage(image, source);
  image.onerror = () => setImage(null, source); // e.g. TIFF: the server reads it, the browser cannot show it
  image.src = URL.createObjectURL(file);
}

$("file-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) useFile(file);
  event.target.value = ""; // choosing the same file again still fires "change"
});

// Drag and drop: an image file from the desktop, or a thumbnail of this page (an indexed image, searched by path).
const PATH_TYPE = "application/x-camretrieval-path";
const isImageFile = (file) => file && (file.type.startsWith("image/") || /\.(jpe?g|png|webp|bmp|tiff?)$/i.test(file.name));
const carriesQuery = (event) =>
  Boolean(event.dataTransfer) && [...event.dataTransfer.types].some((t) => t === "Files" || t === PATH_TYPE);
let dragDepth = 0;

function markDropTarget(on) {
  $("query-panel").classList.toggle("drop-target", on);
}
document.addEventListener("dragenter", (event) => {
  if (!carriesQuery(event)) return;
  event.preventDefault();
  dragDepth += 1;
  markDropTarget(true);
});
document.addEventListener("dragover", (event) => {
  if (!carriesQuery(event)) return;
  event.preventDefault(); // without it the browser opens the dropped file in place of the page
  event.dataTransfer.dropEffect = "copy";
});
document.addEventListener("dragleave", (event) => {
  if (!carriesQuery(event)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) markDropTarget(false);
});
document.addEventListener("drop", (event) => {
  if (!carriesQuery(event)) return;
  event.preventDefault();
  dragDepth = 0;
  markDropTarget(false);
  const path = event.dataTransfer.getData(PATH_TYPE);
  if (path) {
    pick(path);
    return;
  }
  const files = [...event.dataTransfer.files];
  const file = files.find(isImageFile);
  if (file) useFile(file, "dropped");
  else setStatus(`${files.length ? files[0].name : "that"} is not an image: drop a JPEG, PNG, WebP, BMP or TIFF`, true);
});

function draggablePath(image, path) {
  image.draggable = true;
  image.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData(PATH_TYPE, path);
    event.dataTransfer.setData("text/plain", path);
    event.dataTransfer.effectAllowed = "copy";
  });
}

// Paste: an image copied anywhere (a screenshot, an image copied in another page) becomes the query.
document.addEventListener("paste", (event) => {
  const data = event.clipboardData;
  if (!data) return;
  const file = [...data.files].find(isImageFile);
  if (!file) return; // text pasted into the filter or a number field goes on as usual
  event.preventDefault();
  // A copied screenshot comes as "image.png" (or with no name): name it after where it came from.
  const extension = (file.type.split("/")[1] || "png").replace("jpeg", "jpg");
  const generic = !file.name || /^image\.\w+$/.test(file.name);
  useFile(generic ? new File([file], `pasted.${extension}`, { type: file.type }) : file, "pasted");
});

// --- picking an indexed image ---

$("pick-button").addEventListener("click", () => {
  const picker = $("picker");
  picker.hidden = !picker.hidden;
  $("pick-button").setAttribute("aria-expanded", String(!picker.hidden));
  if (!picker.hidden) loadPicker();
});

let filterTimer = null;
$("picker-filter").addEventListener("input", (event) => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    state.picker.q = event.target.value;
    state.picker.offset = 0;
    loadPicker();
  }, 250);
});
$("picker-prev").addEventListener("click", () => {
  state.picker.offset = Math.max(0, state.picker.offset - state.picker.limit);
  loadPicker();
});
$("picker-next").addEventListener("click", () => {
  if (state.picker.offset + state.picker.limit < state.picker.total) {
    state.picker.offset += state.picker.limit;
    loadPicker();
  }
});

async function loadPicker() {
  const { q, offset, limit } = state.picker;
  try {
    const data = await api("/api/images?" + new URLSearchParams({ q, offset, limit }));
    state.picker.total = data.total;
    const grid = $("picker-grid");
    grid.replaceChildren(
      ...data.paths.map((path) => {
        const image = document.createElement("img");
        image.className = "loading";
        image.addEventListener("load", () => image.classList.remove("loading"));
        image.addEventListener("error", () => image.classList.replace("loading", "unavailable"));
        image.src = pathUrl("/api/thumbnails/", path) + "?size=128";
        image.alt = image.title = path;
        image.loading = "lazy";
        image.addEventListener("click", () => pick(path));
        draggablePath(image, path);
        return image;
      }),
    );
    const last = Math.min(offset + limit, data.total);
    $("picker-page").textContent = data.total ? `${offset + 1}–${last} of ${data.total}` : "no match";
  } catch (error) {
    setStatus(error.message, true);
  }
}

function pick(path) {
  const image = new Image();
  image.onload = () => setImage(image, { kind: "path", path });
  image.onerror = () => setImage(null, { kind: "path", path });
  image.src = pathUrl("/api/images/", path);
  setStatus(`query: ${path}`);
}

// --- searching ---

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.source) return;
  const source = state.source;
  const form = new FormData();
  if (source.kind === "path" && hasRawBytes(source.path)) {
    // A form field cannot carry a name that is not UTF-8 (the browser replaces its bytes): the indexed file itself
    // is sent instead, which the server decodes to the same pixels, so the search is the same.
    try {
      const response = await fetch(pathUrl("/api/images/", source.path));
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      form.append("file", await response.blob(), source.path.split("/").pop());
    } catch (error) {
      setStatus(error.message, true);
      return;
    }
  } else if (source.kind === "path") form.append("path", source.path);
  else if (source.queryId) form.append("query_id", source.queryId); // the server still has it: no second upload
  else form.append("file", source.file, source.file.name);
  if (state.box) form.append("box", state.box.join(","));
  form.append("top", $("top").value || "20");
  if (!$("refine").disabled && $("refine").checked) form.append("refine", "true"); // the rest is its expert form
  else {
    if (!$("online").disabled && $("online").checked) form.append("online", "true");
    if (!$("rerank").disabled) form.append("rerank", $("rerank").value || "0");
    if (!$("qe").disabled) form.append("qe", $("qe").value || "0");
  }
  $("search-button").disabled = true;
  setStatus("searching…");
  $("results").dataset.state = "searching";
  $("results").setAttribute("aria-busy", "true");
  try {
    const [entry] = await api("/api/search", { method: "POST", body: form });
    if (source.kind === "upload") source.queryId = entry.query_id;
    state.last = { entry, source };
    showResults(entry);
    setStatus(`${entry.results.length} results in ${(entry.seconds * 1000).toFixed(0)} ms`);
  } catch (error) {
    setStatus(error.message, true);
    $("results").dataset.state = "error";
  } finally {
    $("search-button").disabled = false;
    $("results").removeAttribute("aria-busy");
  }
});

function showResults(entry) {
  const grid = $("results");
  grid.replaceChildren(
    ...entry.results.map((hit, i) => {
      const figure = document.createElement("figure");
      figure.className = "hit";
      figure.tabIndex = 0;
      figure.dataset.path = hit.path;
      // A placeholder (animated while it loads) holds the tile's place until its thumbnail arrives.
      figure.classList.add("loading");
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const image = document.createElement("img");
      image.alt = hit.path;
      image.decoding = "async";
      image.addEventListener("load", () => figure.classList.remove("loading"));
      // An indexed file the server will not show (moved since, or a symlink out of the image folder).
      image.addEventListener("error", () => figure.classList.replace("loading", "unavailable"));
      image.src = pathUrl("/api/thumbnails/", hit.path) + "?size=256";
      draggablePath(image, hit.path);
      thumb.append(image);
      const caption = document.createElement("figcaption");
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${i + 1} `;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = hit.score.toFixed(3);
      const path = document.createElement("div");
      path.className = "path";
      path.textContent = hit.path;
      caption.append(rank, score, path);
      figure.append(thumb, caption);
      figure.addEventListener("click", () => explain(hit, i + 1));
      figure.addEventListener("keydown", (e) => e.key === "Enter" && explain(hit, i + 1));
      return figure;
    }),
  );
  const box = entry.box ? ` (box ${entry.box.map((v) => Math.round(v)).join(", ")})` : "";
  $("results-summary").textContent = `${entry.results.length} for ${entry.query}${box}: click a result to see why it matched`;
  const used = $("results-refinement");
  used.textContent = refinementText(entry.refinement);
  used.hidden = false;
  $("export-json").disabled = $("export-csv").disabled = entry.results.length === 0;
  grid.dataset.state = "done";
}

// What the server applied, in words: e.g. "online aggregation (OnA) · re-ranked the top 30 ..." or "none, plain search".
function refinementText(r) {
  if (!r) return "";
  if (r.refine) return `Refinement: the best for a boxed object, online aggregation with the query's top ${r.online_classes} classes, unwhitened`;
  const parts = [];
  if (r.online) parts.push("online aggregation (OnA)");
  if (r.rerank) parts.push(`re-ranked the top ${r.rerank} with CAM regions (N_re = ${r.rerank_classes})`);
  if (r.qe) parts.push((r.qe_alpha ? `α-QE with the top ${r.qe} (α = ${r.qe_alpha})` : `query expansion with the top ${r.qe}`)
    + (r.qe_gate ? ` that are ${r.qe_gate}-reciprocal neighbours of the query` : ""));
  return "Refinement: " + (parts.length ? parts.join(" · ") : "none, plain search (offline aggregation, OfA)");
}

// --- exporting the results (made here, in the browser) ---

function exportName(extension) {
  const stem = (state.last.entry.query || "query").split("/").pop().replace(/\.[^.]*$/, "");
  return `camretrieval-${stem.replace(/[^\w.-]+/g, "_") || "query"}.${extension}`;
}

function download(text, type, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// The shape of `camretrieval search --json`, with the box and the refinement of this search.
function resultsJson(entry) {
  const record = { query: entry.query, box: entry.box, refinement: entry.refinement, results: entry.results };
  return JSON.stringify([record], null, 2) + "\n";
}

// A cell as CSV (RFC 4180 quoting); text that a spreadsheet would run as a formula gets a leading apostrophe.
function csvCell(value) {
  let text = String(value ?? "");
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = "'" + text;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function resultsCsv(entry) {
  const box = entry.box ? entry.box.join(" ") : "";
  const rows = [["query", "box", "rank", "path", "score"]];
  entry.results.forEach((hit, i) => rows.push([entry.query, box, i + 1, hit.path, hit.score]));
  return rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

$("export-json").addEventListener("click", () => {
  if (state.last) download(resultsJson(state.last.entry), "application/json", exportName("json"));
});
$("export-csv").addEventListener("click", () => {
  if (state.last) download(resultsCsv(state.last.entry), "text/csv", exportName("csv"));
});

// --- why it matched ---

async function explain(hit, rank) {
  const { entry, source } = state.last;
  const params = queryString({
    result: hit.path,
    query_id: entry.query_id || null,
    path: entry.query_id ? null : source.path,
    box: entry.box ? entry.box.join(",") : null,
  });
  const dialog = $("explain");
  $("explain-title").textContent = `#${rank} ${hit.path} (score ${hit.score.toFixed(3)})`;
  $("explain-classes").replaceChildren();
  $("explain-region").textContent = "";
  $("explain-query").removeAttribute("src");
  $("explain-result").removeAttribute("src");
  setStatus("computing the CAMs…", false, $("explain-status"));
  if (!dialog.open) dialog.showModal();
  try {
    const data = await api("/api/explain?" + params);
    const heatmap = data.query.heatmap_classes.length;
    $("explain-classes").replaceChildren(
      ...data.query.classes.map((c, i) => {
        const item = document.createElement("li");
        item.className = i < heatmap ? "heatmap" : "";
        const probability = document.createElement("span");
        probability.className = "prob";
        probability.textContent = ` ${(100 * c.probability).toFixed(1)}%`;
        item.append(c.name, probability);
        return item;
      }),
    );
    const r = data.result;
    const where = r.region_is_whole_image ? "the whole image (no CAM region)" : `[${r.region.map((v) => Math.round(v)).join(", ")}]`;
    $("explain-region").textContent =
      `Region that matched: ${where}, similarity ${r.region_score.toFixed(3)}; whole image ${r.score.toFixed(3)}.`;
    $("explain-query").src = data.overlays.query;
    $("explain-result").src = data.overlays.result;
    dialog.dataset.state = "done";
    setStatus("", false, $("explain-status"));
  } catch (error) {
    setStatus(error.message, true, $("explain-status"));
  }
}

window.addEventListener("resize", () => {
  fitCanvas();
  draw();
});

loadInfo().catch((error) => setStatus(`cannot read the index: ${error.message}`, true));

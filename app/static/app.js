// modserve demo page: lists the models, sends an image (and scalar) to the native API and draws
// the answer. Plain browser JavaScript, no build step, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // GET /v1/models entries
  model: null,         // the selected entry
  image: null,         // {blob, name, url, bitmap}
  seq: 0,              // request counter: only the newest answer is drawn
  pending: null,       // timer of a debounced prediction
};

// A colour for grey-level masks (e.g. 0/255): RGB masks keep their own colours.
const GREY_TINT = [255, 40, 120];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- errors ---------------------------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function apiError(response) {
  // The API answers {"error": "..."} for every failure; fall back to the status line otherwise.
  let detail = "";
  try {
    const body = await response.clone().json();
    detail = body && (body.error || body.detail) ? String(body.error || body.detail) : "";
  } catch (_) {
    try { detail = (await response.text()).slice(0, 300); } catch (_) { /* ignore */ }
  }
  const status = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  return detail ? `${status}: ${detail}` : status;
}

// ---- models ---------------------------------------------------------------------------------

function scalarInput(model) {
  return (model && model.inputs || []).find((i) => i.name === "scalar") || null;
}

function scalarWidth(model) {
  const spec = scalarInput(model);
  if (!spec) return 0;
  return spec.shape.length > 1 && spec.shape[1] > 0 ? spec.shape[1] : 1;
}

function modelSummary(m) {
  if (!m.ready) return `not ready${m.reason ? ": " + m.reason : ""}`;
  const parts = [m.task, m.architecture];
  if (m.version) parts.push(`v${m.version}`);
  if (scalarInput(m)) parts.push("image + scalar");
  return parts.filter(Boolean).join(" · ");
}

function renderModels() {
  const box = $("models");
  box.replaceChildren();
  if (!state.models.length) {
    box.append(el("p", { class: "muted", text: "The store holds no models." }));
    return;
  }
  for (const m of state.models) {
    const id = `model-${m.name}`;
    const input = el("input", { type: "radio", name: "model", id, value: m.name });
    input.disabled = !m.ready;
    input.checked = state.model && state.model.name === m.name;
    input.addEventListener("change", () => selectModel(m.name));
    const label = el("label", { for: id, class: "model" + (m.ready ? "" : " disabled") },
      input,
      el("span", { class: "model-name", text: m.name }),
      el("span", { class: "model-info muted", text: modelSummary(m) }));
    box.append(label);
  }
}

async function loadModels() {
  const box = $("models");
  try {
    const response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(await apiError(response));
    const body = await response.json();
    state.models = (body.models || []).slice().sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
    const preferred = state.models.find((m) => m.ready && m.name === "shapes_unet")
      || state.models.find((m) => m.ready);
    state.model = preferred || null;
    renderModels();
    box.dataset.state = "ready";
    updateScalarBox();
    updateButtons();
  } catch (err) {
    box.dataset.state = "error";
    box.replaceChildren(el("p", { class: "muted", text: "Could not list the models." }));
    showError(`Listing the models failed: ${err.message || err}`);
  }
}

function rank(m) {
  // Trained demo models first, then ready ones, then the rest.
  return (m.name.startsWith("shapes_") ? 0 : 2) + (m.ready ? 0 : 1);
}

function selectModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  updateScalarBox();
  updateButtons();
  schedulePredict(0);
}

function updateScalarBox() {
  const width = scalarWidth(state.model);
  $("scalar-box").hidden = width === 0;
  $("scalar-range").hidden = width !== 1;
  $("scalar-hint").textContent = width > 1
    ? `This model takes ${width} scalars: enter them separated by commas.`
    : "A number; for shapes_extra it decides between “low” (≤ 0.5) and “high”.";
}

function updateButtons() {
  $("predict").disabled = !(state.model && state.model.ready && state.image);
}

// ---- images ---------------------------------------------------------------------------------

async function loadSamples() {
  const box = $("samples");
  try {
    const response = await fetch("/static/samples/index.json");
    if (!response.ok) throw new Error(await apiError(response));
    const { samples } = await response.json();
    for (const s of samples) {
      const button = el("button", { type: "button", class: "sample", "data-file": s.file, title: s.title },
        el("img", { src: `/static/samples/${s.file}`, alt: s.title, width: 64, height: 64 }));
      button.addEventListener("click", () => useSample(s, button));
      box.append(button);
    }
  } catch (err) {
    box.append(el("p", { class: "muted small", text: `No samples (${err.message || err}).` }));
  }
}

async function useSample(sample, button) {
  clearError();
  try {
    const response = await fetch(`/static/samples/${sample.file}`);
    if (!response.ok) throw new Error(await apiError(response));
    const blob = await response.blob();
    for (const b of document.querySelectorAll(".sample")) b.classList.toggle("active", b === button);
    await setImage(blob, sample.file);
  } catch (err) {
    showError(`Loading the sample failed: ${err.message || err}`);
  }
}

async function setImage(blob, name) {
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(blob);
  } catch (_) {
    bitmap = null;  // the browser cannot show it: the server may still answer (or explain why not)
  }
  if (state.image && state.image.bitmap) state.image.bitmap.close();
  state.image = { blob, name, bitmap };
  drawImage();
  updateButtons();
  schedulePredict(0);
}

function drawImage() {
  const canvas = $("image-canvas");
  const overlay = $("overlay");
  const bitmap = state.image && state.image.bitmap;
  clearOverlay();
  if (!bitmap) {
    $("stage").hidden = true;
    $("placeholder").hidden = false;
    $("placeholder").textContent = state.image ? `${state.image.name}: the browser cannot display this image.` : "Pick a sample or upload an image.";
    return;
  }
  canvas.width = overlay.width = bitmap.width;
  canvas.height = overlay.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  $("stage").style.aspectRatio = `${bitmap.width} / ${bitmap.height}`;
  $("stage").hidden = false;
  $("placeholder").hidden = true;
}

function overlayContext() {
  // The page reads the mask back (getImageData) on every answer.
  return $("overlay").getContext("2d", { willReadFrequently: true });
}

function clearOverlay() {
  const overlay = $("overlay");
  overlayContext().clearRect(0, 0, overlay.width, overlay.height);
  overlay.dataset.drawn = "false";
  $("opacity-row").hidden = true;
}

async function drawMask(prediction) {
  const bytes = Uint8Array.from(atob(prediction.mask), (c) => c.charCodeAt(0));
  const mask = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
  const overlay = $("overlay");
  const { width, height } = mask;
  if (overlay.width !== width || overlay.height !== height) {
    overlay.width = width;
    overlay.height = height;
  }
  const ctx = overlayContext();
  ctx.clearRect(0, 0, width, height);
  ctx.drawImage(mask, 0, 0);
  mask.close();
  const pixels = ctx.getImageData(0, 0, width, height);
  const d = pixels.data;
  let painted = 0;
  for (let i = 0; i < d.length; i += 4) {
    const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
    if (r === 0 && g === 0 && b === 0) {          // class 0 (background): transparent
      d[i + 3] = 0;
    } else {
      if (r === g && g === b) {                   // grey-level mask: tint, brighter for higher values
        const k = r / 255;
        d[i] = Math.round(GREY_TINT[0] * k); d[i + 1] = Math.round(GREY_TINT[1] * k); d[i + 2] = Math.round(GREY_TINT[2] * k);
      }
      d[i + 3] = 255;
      painted += 1;
    }
  }
  ctx.putImageData(pixels, 0, 0);
  overlay.dataset.drawn = "true";
  overlay.dataset.painted = String(painted);
  $("opacity-row").hidden = false;
  applyOpacity();
}

function applyOpacity() {
  const value = Number($("opacity").value);
  $("overlay").style.opacity = String(value);
  $("opacity-value").textContent = `${Math.round(value * 100)}%`;
}

// ---- prediction -----------------------------------------------------------------------------

function readScalar() {
  const width = scalarWidth(state.model);
  if (!width) return null;
  const text = $("scalar").value.trim();
  const values = text.split(",").map((v) => v.trim()).filter((v) => v !== "");
  if (values.length !== width || values.some((v) => !Number.isFinite(Number(v)))) {
    throw new Error(width === 1 ? "Enter a number as the scalar, e.g. 0.75." : `Enter ${width} numbers separated by commas.`);
  }
  return values.join(",");
}

function schedulePredict(delay = 150) {
  if (state.pending) clearTimeout(state.pending);
  state.pending = setTimeout(() => { state.pending = null; predict(); }, delay);
}

async function predict() {
  if (!state.model || !state.image) return;
  if (!state.model.ready) {
    showError(`Model ${state.model.name} is not ready${state.model.reason ? ": " + state.model.reason : ""}.`);
    return;
  }
  const result = $("result");
  let scalar;
  try {
    scalar = readScalar();
  } catch (err) {
    showError(err.message);
    return;
  }
  const seq = ++state.seq;
  const model = state.model;
  const form = new FormData();
  form.append("image", state.image.blob, state.image.name || "image");
  if (scalar !== null) form.append("scalar", scalar);
  result.dataset.state = "busy";
  $("predict").setAttribute("aria-busy", "true");
  const started = performance.now();
  let response, body;
  try {
    response = await fetch(`/v1/models/${encodeURIComponent(model.name)}/predict`, {
      method: "POST", body: form, headers: { Accept: "application/json" },
    });
    if (!response.ok) throw new Error(await apiError(response));
    body = await response.json();
  } catch (err) {
    if (seq !== state.seq) return;
    result.dataset.state = "error";
    $("predict").removeAttribute("aria-busy");
    clearOverlay();
    $("answer").hidden = true;
    const message = err instanceof TypeError ? `The service cannot be reached (${err.message}).` : err.message;
    showError(`${model.name}: ${message}`);
    return;
  }
  const latency = performance.now() - started;
  if (seq !== state.seq) return;  // a newer request is on its way
  clearError();
  $("predict").removeAttribute("aria-busy");
  try {
    await render(model, body, response.headers, latency, scalar);
  } catch (err) {
    result.dataset.state = "error";
    showError(`${model.name}: cannot show the answer (${err.message || err}).`);
    return;
  }
  if (seq !== state.seq) return;
  result.dataset.state = "done";
  result.dataset.seq = String(seq);
}

async function render(model, body, headers, latency, scalar) {
  const prediction = (body.predictions || [])[0];
  if (!prediction) throw new Error("the answer holds no prediction");
  $("answer").hidden = false;
  $("model-name").textContent = body.model_name || model.name;
  $("version").textContent = body.model_version || headers.get("X-Model-Version") || "?";
  $("latency").textContent = `${latency.toFixed(0)} ms`;
  const sha = headers.get("X-Model-Sha256") || model.sha256 || "";
  $("sha").textContent = sha ? sha.slice(0, 12) + "…" : "—";
  $("sha").title = sha;
  const heads = $("heads");
  heads.replaceChildren();

  if (prediction.mask !== undefined) {
    await drawMask(prediction);
    const fractions = prediction.class_fractions || {};
    const top = Object.entries(fractions).filter(([name]) => name !== "background").sort((a, b) => b[1] - a[1])[0];
    $("label-title").textContent = "Mask";
    $("label").textContent = `${prediction.width} × ${prediction.height}`;
    $("label-prob").textContent = top ? `${top[0]}: ${(top[1] * 100).toFixed(1)}% of the pixels` : "";
    heads.append(barChart("class_fractions", Object.keys(fractions), Object.values(fractions), -1, "% of pixels"));
    return;
  }

  clearOverlay();
  const label = prediction.label || {};
  const names = model.labels || [];
  $("label-title").textContent = scalar !== null ? `Label (scalar ${scalar})` : "Label";
  $("label").textContent = label.name !== undefined ? label.name : "—";
  const probs = prediction.probs;
  $("label-prob").textContent = Array.isArray(probs) && label.index !== undefined
    ? `${(probs[label.index] * 100).toFixed(1)}%` : "";
  for (const [head, values] of Object.entries(prediction)) {
    if (head === "label" || !Array.isArray(values)) continue;
    const flat = values.flat(Infinity);
    const labels = head === "probs" && names.length === flat.length ? names : flat.map((_, i) => String(i));
    heads.append(barChart(head, labels, flat, head === "probs" ? label.index : -1, head === "probs" ? "%" : ""));
  }
}

// ---- charts ---------------------------------------------------------------------------------

function barChart(title, labels, values, highlight, unit) {
  const figure = el("figure", { class: "chart", "data-head": title });
  figure.append(el("figcaption", { text: `${title} (${values.length})` }));
  if (values.length > 32) {
    figure.append(denseChart(values));
    const max = Math.max(...values), min = Math.min(...values);
    const arg = values.indexOf(max);
    figure.append(el("p", { class: "muted small", text: `index 0 … ${values.length - 1}; min ${fmt(min)}, max ${fmt(max)} at ${labels[arg]}` }));
    return figure;
  }
  const list = el("ol", { class: "bars" });
  const percent = unit.startsWith("%");
  const peak = percent ? 1 : Math.max(1e-12, ...values.map((v) => Math.abs(v)));
  values.forEach((v, i) => {
    const width = Math.max(0, Math.min(100, (Math.abs(v) / peak) * 100));
    const bar = el("span", { class: "bar" + (v < 0 ? " negative" : "") });
    bar.style.width = `${width}%`;
    list.append(el("li", { class: i === highlight ? "best" : "", "data-label": labels[i] },
      el("span", { class: "bar-label", text: labels[i] }),
      el("span", { class: "bar-track" }, bar),
      el("span", { class: "bar-value", text: percent ? `${(v * 100).toFixed(1)}%` : fmt(v) })));
  });
  figure.append(list);
  return figure;
}

function denseChart(values) {
  const canvas = el("canvas", { class: "dense", width: 600, height: 90, role: "img", "aria-label": `${values.length} values` });
  const ctx = canvas.getContext("2d");
  const max = Math.max(1e-12, ...values.map((v) => Math.abs(v)));
  const mid = values.some((v) => v < 0) ? canvas.height / 2 : canvas.height;
  const w = canvas.width / values.length;
  ctx.fillStyle = "#3b6fd8";
  values.forEach((v, i) => {
    const h = (Math.abs(v) / max) * (mid === canvas.height ? canvas.height : canvas.height / 2);
    ctx.fillRect(i * w, v >= 0 ? mid - h : mid, Math.max(w, 1), h);
  });
  return canvas;
}

function fmt(v) {
  return Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(2) : v.toFixed(3);
}

// ---- wiring ---------------------------------------------------------------------------------

function init() {
  $("file").addEventListener("change", async (event) => {
    const file = event.target.files && event.target.files[0];
    if (!file) return;
    clearError();
    for (const b of document.querySelectorAll(".sample")) b.classList.remove("active");
    await setImage(file, file.name);
  });
  $("scalar-range").addEventListener("input", () => {
    $("scalar").value = $("scalar-range").value;
    schedulePredict();
  });
  $("scalar").addEventListener("input", () => {
    const v = Number($("scalar").value);
    if (Number.isFinite(v) && $("scalar").value.trim() !== "") $("scalar-range").value = String(v);
    schedulePredict(300);
  });
  $("scalar").addEventListener("keydown", (e) => { if (e.key === "Enter") schedulePredict(0); });
  $("opacity").addEventListener("input", applyOpacity);
  $("predict").addEventListener("click", () => schedulePredict(0));
  applyOpacity();
  loadModels();
  loadSamples();
}

document.addEventListener("DOMContentLoaded", init);

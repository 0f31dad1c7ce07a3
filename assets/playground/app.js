// The playground: a form over POST /generate (as a job: Prefer: respond-async), live progress
// from GET /jobs/{id}/events, cancel with DELETE /jobs/{id}, ratings to POST /feedback, and a
// history of this browser's generations read back from GET /generations/{id}.

import { ApiError, apiKey, call, jobEvents, setApiKey } from "./api.js";

const HISTORY_STORE = "fewstep.history";
const HISTORY_MAX = 50;
// History entries read back from the server at a time (each is one request).
const HISTORY_SHOWN = 20;
const IMAGE_FORMATS = ["png", "jpeg", "webp"];
const VIDEO_FORMATS = ["gif", "apng", "mp4"];

const $ = (id) => document.getElementById(id);
const form = $("gen-form");
const ui = {
  prompt: $("prompt"), negative: $("negative"), model: $("model"), modelHelp: $("model-help"),
  steps: $("steps"), guidance: $("guidance"), frames: $("frames"), format: $("format"),
  n: $("n"), size: $("size"), seed: $("seed"), generate: $("generate"), cancel: $("cancel"),
  progressBox: $("progress-box"), bar: $("bar"), status: $("status"), error: $("error"),
  results: $("results"), resultsMeta: $("results-meta"), history: $("history"),
  historyNote: $("history-note"), keyBox: $("key-box"), keyForm: $("key-form"),
  key: $("api-key"), keyState: $("key-state"), keyNote: $("key-note"),
};

let models = [];
// The running job: {id, cancelling}.
let job = null;

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// A thumb drawn inline: emoji fonts are not on every machine (nor in headless browsers).
function thumbIcon(down) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const path = document.createElementNS(ns, "path");
  for (const [k, v] of [["viewBox", "0 0 24 24"], ["width", "20"], ["height", "20"], ["aria-hidden", "true"], ["class", down ? "icon down" : "icon"]]) svg.setAttribute(k, v);
  path.setAttribute("d", "M2 10h4v11H2zM8 10l4-8c1.6 0 2.6 1.2 2.4 2.8L14 9h6c1.2 0 2.1 1.1 1.9 2.3l-1.6 7.9c-.2 1.1-1.2 1.8-2.3 1.8H8z");
  path.setAttribute("fill", "currentColor");
  svg.append(path);
  return svg;
}

function num(v) {
  return typeof v === "number" ? (v < 10 ? v.toFixed(1) : String(Math.round(v))) : "–";
}

function ms(v) {
  return typeof v === "number" ? `${num(v)} ms` : "–";
}

function shortVersion(v) {
  return v && v.length > 12 ? v.slice(0, 12) : v || "–";
}

function showError(e) {
  if (e?.name === "AbortError") return;
  const err = e instanceof ApiError ? e : new ApiError(0, { title: "Error", detail: String(e?.message || e) });
  const parts = [
    el("strong", { text: err.status ? `${err.title} (${err.status})` : err.title }),
    err.detail && el("span", { text: ` ${err.detail}` }),
    err.code && " ",
    err.code && el("code", { text: err.code }),
    err.retryAfter && el("span", { text: ` Retry after ${err.retryAfter} s.` }),
  ];
  ui.error.replaceChildren(...parts.filter(Boolean));
  ui.error.hidden = false;
  if (err.code === "missing_api_key" || err.code === "invalid_api_key") askForKey(err);
  else ui.error.scrollIntoView({ block: "nearest" });
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function askForKey(err) {
  ui.keyNote.textContent = err.code === "missing_api_key" ? "This server needs an API key." : "The server refused this API key.";
  ui.keyBox.open = true;
  ui.key.focus();
}

function showKeyState() {
  ui.keyState.textContent = apiKey() ? "(set)" : "(none)";
}

// ---------------------------------------------------------------- models and the form

async function loadModels() {
  try {
    const list = await call("GET", "models");
    models = list.models;
    const previous = ui.model.value || localStorage.getItem("fewstep.model");
    ui.model.replaceChildren(
      ...models.map((m) =>
        el("option", { value: m.id, text: m.trained ? m.id : `${m.id} (untrained)` }),
      ),
    );
    ui.model.value = models.some((m) => m.id === previous) ? previous : list.default_model;
    applyModel();
    clearError();
    return true;
  } catch (e) {
    showError(e);
    return false;
  }
}

function currentModel() {
  return models.find((m) => m.id === ui.model.value);
}

/** Fills steps, guidance, frames, sizes and n from the chosen model's card. */
function applyModel() {
  const m = currentModel();
  if (!m) return;
  localStorage.setItem("fewstep.model", m.id);
  ui.modelHelp.textContent = `${m.description} · version ${shortVersion(m.version)}`;
  ui.steps.replaceChildren(
    ...m.allowed_steps.map((s) => el("option", { value: s, text: s === m.default_steps ? `${s} (default)` : s })),
  );
  ui.steps.value = String(m.default_steps);
  ui.guidance.max = String(m.max_guidance);
  ui.guidance.value = String(m.default_guidance);
  ui.guidance.disabled = m.max_guidance <= 1;
  ui.guidance.title = ui.guidance.disabled ? "This model runs without classifier-free guidance" : "";
  ui.frames.replaceChildren(
    ...m.frames.map((f) => el("option", { value: f, text: f === 1 ? "1 (image)" : `${f} (video)` })),
  );
  ui.size.replaceChildren(
    ...m.sizes.map((s) => el("option", { value: `${s.width}x${s.height}`, text: `${s.width}×${s.height}` })),
  );
  ui.n.max = String(m.max_batch);
  if (Number(ui.n.value) > m.max_batch) ui.n.value = String(m.max_batch);
  applyFrames();
}

function applyFrames() {
  const formats = Number(ui.frames.value) > 1 ? VIDEO_FORMATS : IMAGE_FORMATS;
  ui.format.replaceChildren(...formats.map((f, i) => el("option", { value: f, text: i ? f : `${f} (default)` })));
}

/** The request body as JSON text (a seed above 2^53 is written digit for digit). */
function requestBody() {
  const m = currentModel();
  const [width, height] = ui.size.value.split("x").map(Number);
  const body = {
    prompt: ui.prompt.value,
    model: m?.id,
    steps: Number(ui.steps.value),
    n: ui.n.value === "" ? 1 : Number(ui.n.value),
    num_frames: Number(ui.frames.value) || 1,
    output_format: ui.format.value,
  };
  if (width && height) Object.assign(body, { width, height });
  if (ui.negative.value.trim()) body.negative_prompt = ui.negative.value;
  if (!ui.guidance.disabled && ui.guidance.value !== "") body.guidance = Number(ui.guidance.value);
  const seed = ui.seed.value.trim();
  if (seed && !/^\d+$/.test(seed)) throw new ApiError(0, { title: "Invalid seed", detail: "The seed is a whole number from 0 to 2^63-1 (or empty for a random one)." });
  const json = JSON.stringify(body);
  return seed ? `${json.slice(0, -1)},"seed":${seed}}` : json;
}

// ---------------------------------------------------------------- running a job

function setRunning(running) {
  job = running;
  ui.generate.setAttribute("aria-disabled", running ? "true" : "false");
  ui.cancel.hidden = !running;
  ui.cancel.disabled = false;
  ui.progressBox.hidden = !running;
  form.setAttribute("aria-busy", running ? "true" : "false");
}

function showProgress(p) {
  const percent = p.percent ?? p.progress ?? 0;
  ui.bar.value = percent;
  const stage = p.stage ? ` · ${p.stage.replace("_", " ")}` : "";
  const eta = typeof p.eta_s === "number" ? ` · about ${p.eta_s.toFixed(1)} s left` : "";
  ui.status.textContent = `Step ${p.step} of ${p.steps}${stage} · ${percent}%${eta}`;
}

async function generate() {
  if (job) return;
  clearError();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e);
    return;
  }
  const prompt = ui.prompt.value;
  setRunning({ id: null, cancelling: false });
  ui.bar.value = 0;
  ui.status.textContent = "Submitting…";
  try {
    const accepted = await call("POST", "generate", {
      json: body,
      headers: { Prefer: "respond-async" },
    });
    job.id = accepted.id;
    const final = await follow(accepted.id);
    finish(final, prompt);
  } catch (e) {
    ui.status.textContent = "Failed.";
    showError(e);
  } finally {
    const hadFocus = document.activeElement === ui.cancel;
    setRunning(null);
    if (hadFocus || document.activeElement === document.body) ui.generate.focus();
  }
}

/** Follows a job's events to its end; falls back to polling if the stream breaks. */
async function follow(id) {
  try {
    for await (const { event, data } of jobEvents(id)) {
      if (event === "queued") ui.status.textContent = `Queued${data?.position ? `, position ${data.position}` : ""}…`;
      else if (event === "progress" && data) showProgress(data);
      else if (["completed", "failed", "cancelled"].includes(event)) return data || (await call("GET", `jobs/${encodeURIComponent(id)}`));
    }
  } catch (e) {
    if (e instanceof ApiError) throw e;
    // A dropped connection: the job goes on server-side; ask for its state instead.
  }
  for (;;) {
    const state = await call("GET", `jobs/${encodeURIComponent(id)}`);
    if (["completed", "failed", "cancelled"].includes(state.state)) return state;
    showProgress(state);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function finish(final, prompt) {
  if (final.state === "completed" && final.result) {
    ui.bar.value = 100;
    const r = final.result;
    ui.status.textContent = `Done: ${r.outputs.length} output${r.outputs.length === 1 ? "" : "s"} in ${ms(r.timings.total_ms)}.`;
    remember(r.id, prompt);
    showResult({ ...r, prompt }, []);
    refreshHistory();
  } else if (final.state === "cancelled") {
    ui.status.textContent = "Cancelled.";
  } else {
    ui.status.textContent = "Failed.";
    showError(new ApiError(0, { title: "The generation failed", detail: final.error?.message, code: final.error?.code }));
  }
}

async function cancel() {
  if (!job?.id || job.cancelling) return;
  job.cancelling = true;
  ui.cancel.disabled = true;
  ui.status.textContent = "Cancelling…";
  try {
    await call("DELETE", `jobs/${encodeURIComponent(job.id)}`);
  } catch (e) {
    // Finished meanwhile: the event stream delivers the result.
    if (!(e instanceof ApiError && e.status === 409)) showError(e);
  }
}

// ---------------------------------------------------------------- results and ratings

function base64ToBlob(data, type) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

let resultUrls = [];

/** Shows a generation's outputs, each with its details and rating controls. */
function showResult(r, feedback) {
  resultUrls.forEach((u) => URL.revokeObjectURL(u));
  resultUrls = [];
  const kind = r.outputs[0]?.num_frames > 1 ? "video" : "image";
  ui.resultsMeta.replaceChildren(
    el("span", { text: `${r.id} · ${r.model} · ${r.steps} steps · guidance ${r.guidance} · batch of ${r.batch_size}` }),
  );
  ui.results.replaceChildren(
    ...r.outputs.map((out) => {
      const url = URL.createObjectURL(base64ToBlob(out.data, out.media_type));
      resultUrls.push(url);
      const label = `${kind} ${out.index + 1} of “${r.prompt}”, seed ${out.seed}`;
      const media = out.media_type.startsWith("video/")
        ? el("video", { src: url, controls: true, autoplay: true, loop: true, muted: true, playsinline: true, "aria-label": label })
        : el("img", { src: url, alt: label, width: out.width, height: out.height });
      media.muted = true;
      const t = r.timings;
      const details = el(
        "dl",
        { class: "facts" },
        el("dt", { text: "Seed" }), el("dd", { class: "seed", text: String(out.seed) }),
        el("dt", { text: "Model" }), el("dd", { title: r.model_version, text: `${r.model} @ ${shortVersion(r.model_version)}` }),
        el("dt", { text: "Media" }), el("dd", { text: `${out.media_type}, ${out.width}×${out.height}${out.num_frames > 1 ? `, ${out.num_frames} frames` : ""}` }),
        el("dt", { text: "Total" }), el("dd", { text: ms(t.total_ms) }),
        el("dt", { text: "Stages" }),
        el("dd", { class: "stages", text: `queue ${num(t.queue_ms)}, text ${num(t.text_encoding_ms)}, denoise ${num(t.denoising_ms)}, decode ${num(t.decoding_ms)}, encode ${num(t.encoding_ms)} (ms)` }),
      );
      const mine = feedback.filter((f) => f.output_index === out.index);
      return el("li", { class: "result" }, el("figure", {}, media, el("figcaption", {}, details)), rating(r.id, out.index, mine.at(-1)));
    }),
  );
}

/** Thumbs and a 1-5 rating for one output; each choice is posted at once. */
function rating(generationId, index, last) {
  const state = {
    thumbs: last?.thumbs || null,
    stars: last ? starsOf(last) : null,
  };
  const saved = el("p", { class: "saved", role: "status", "aria-live": "polite" });
  if (last) saved.textContent = `Saved earlier: ${describe(last)}.`;
  const thumb = (value, name) =>
    el("button", { type: "button", class: "thumb", "aria-label": `${name} for output ${index + 1}`, "data-thumbs": value, onclick: () => choose({ thumbs: value }) }, thumbIcon(value === "down"));
  const stars = [1, 2, 3, 4, 5].map((n) =>
    el("button", { type: "button", class: "star", "aria-label": `${n} of 5`, "data-stars": n, onclick: () => choose({ stars: n }) }, "★"),
  );
  const group = el(
    "div",
    { class: "rate", role: "group", "aria-label": `Rate output ${index + 1}` },
    thumb("up", "Thumbs up"),
    thumb("down", "Thumbs down"),
    el("span", { class: "stars", role: "group", "aria-label": "Rating, 1 to 5" }, ...stars),
  );
  paint();
  return el("div", { class: "rating" }, group, saved);

  function paint() {
    group.querySelectorAll(".thumb").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.thumbs === state.thumbs)));
    stars.forEach((b) => {
      const n = Number(b.dataset.stars);
      b.setAttribute("aria-pressed", String(n === state.stars));
      b.classList.toggle("lit", state.stars !== null && n <= state.stars);
    });
  }

  async function choose(change) {
    Object.assign(state, change);
    paint();
    // Each post carries the whole opinion, so the newest row stands on its own.
    const body = { generation_id: generationId, output_index: index };
    if (state.stars !== null) body.score = (state.stars - 1) / 4;
    if (state.thumbs) body.thumbs = state.thumbs;
    saved.textContent = "Saving…";
    saved.classList.remove("bad");
    try {
      const f = await call("POST", "feedback", { json: JSON.stringify(body) });
      saved.textContent = `Saved: ${describe(f)}.`;
      refreshEntry(generationId);
    } catch (e) {
      saved.classList.add("bad");
      saved.textContent = `Not saved: ${e instanceof ApiError ? `${e.title}${e.detail ? ` – ${e.detail}` : ""}` : e}`;
    }
  }
}

/** The 1-5 rating a feedback row holds; null when it is thumbs alone (score 1 or 0). */
function starsOf(f) {
  const thumbsOnly = f.thumbs && f.score === (f.thumbs === "up" ? 1 : 0);
  return thumbsOnly ? null : Math.round(f.score * 4) + 1;
}

/** A feedback row in words: "4 of 5, thumbs up". */
function describe(f) {
  const stars = starsOf(f);
  return [stars === null ? null : `${stars} of 5`, f.thumbs ? `thumbs ${f.thumbs}` : null].filter(Boolean).join(", ");
}

// ---------------------------------------------------------------- history

function history() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]");
    return Array.isArray(list) ? list.filter((h) => typeof h?.id === "string") : [];
  } catch {
    return [];
  }
}

function remember(id, prompt) {
  const list = [{ id, prompt, at: Date.now() }, ...history().filter((h) => h.id !== id)];
  localStorage.setItem(HISTORY_STORE, JSON.stringify(list.slice(0, HISTORY_MAX)));
}

let historyRun = 0;

/** Re-reads this browser's generations from the log, newest first. */
async function refreshHistory() {
  const run = ++historyRun;
  const entries = history().slice(0, HISTORY_SHOWN);
  if (!entries.length) {
    ui.history.replaceChildren(el("li", { class: "hint", text: "No generations from this browser yet." }));
    return;
  }
  const found = await Promise.all(
    entries.map((h) => call("GET", `generations/${encodeURIComponent(h.id)}`).then((g) => ({ h, g }), (e) => ({ h, e }))),
  );
  if (run !== historyRun) return;
  const disabled = found.find((x) => x.e?.code === "log_disabled");
  if (disabled) {
    ui.history.replaceChildren(el("li", { class: "hint", text: "This server keeps no generation log, so it has no history or ratings to show." }));
    return;
  }
  ui.history.replaceChildren(...found.map(({ h, g, e }) => (g ? historyItem(g) : missingItem(h, e))));
}

/** Re-reads one history entry (after a rating), if it is shown. */
async function refreshEntry(id) {
  const shown = [...ui.history.querySelectorAll("li.entry")].find((li) => li.dataset.id === id);
  if (!shown) return refreshHistory();
  try {
    shown.replaceWith(historyItem(await call("GET", `generations/${encodeURIComponent(id)}`)));
  } catch {
    // The history keeps its last reading; the rating itself was saved.
  }
}

function historyItem(g) {
  const latest = new Map();
  for (const f of g.feedback) latest.set(f.output_index, f);
  const ratings = [...latest.entries()].sort((a, b) => a[0] - b[0]).map(([i, f]) => `#${i + 1}: ${describe(f)}`);
  const when = new Date(g.created_ms).toLocaleString();
  return el(
    "li",
    { class: "entry", "data-id": g.id },
    el("p", { class: "entry-prompt", text: g.prompt }),
    el("p", { class: "hint", text: `${when} · ${g.model} @ ${shortVersion(g.model_version)} · ${g.kind} · ${g.steps} steps · seed${g.seeds.length > 1 ? "s" : ""} ${g.seeds.join(", ")}` }),
    el("p", { class: "entry-ratings", text: ratings.length ? `Rated ${ratings.join("; ")} (${g.feedback.length} rating${g.feedback.length === 1 ? "" : "s"} logged)` : "Not rated yet" }),
    el("button", { type: "button", class: "quiet", "aria-label": `Show “${g.prompt}” again`, onclick: () => reopen(g) }, "Show"),
  );
}

function missingItem(h, e) {
  return el(
    "li",
    { class: "entry missing", "data-id": h.id },
    el("p", { class: "entry-prompt", text: h.prompt || h.id }),
    el("p", { class: "hint", text: e instanceof ApiError && e.status === 404 ? "No longer in the server's log (or made with another API key)." : `Could not be read: ${e?.message || e}` }),
  );
}

/** Shows a past generation's outputs (from its job, which the log keeps) to look or rate again. */
async function reopen(g) {
  clearError();
  try {
    const state = await call("GET", `jobs/${encodeURIComponent(g.id)}`);
    if (!state.result) throw new ApiError(0, { title: "Outputs not kept", detail: "The server did not keep this generation's media (its model does not set keep_media)." });
    showResult({ ...state.result, prompt: g.prompt }, g.feedback);
    $("results-title").focus();
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- wiring

form.addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
form.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    generate();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && job) cancel();
});
ui.cancel.addEventListener("click", cancel);
ui.model.addEventListener("change", applyModel);
ui.frames.addEventListener("change", applyFrames);
$("history-clear").addEventListener("click", () => {
  localStorage.removeItem(HISTORY_STORE);
  refreshHistory();
});
ui.keyForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  setApiKey(ui.key.value.trim());
  showKeyState();
  if (await loadModels()) {
    ui.keyNote.textContent = "";
    ui.keyBox.open = false;
    ui.prompt.focus();
    refreshHistory();
  }
});
$("key-clear").addEventListener("click", () => {
  setApiKey("");
  ui.key.value = "";
  showKeyState();
});

ui.key.value = apiKey();
showKeyState();
loadModels().then((ok) => ok && refreshHistory());

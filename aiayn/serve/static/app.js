// aiayn's page: translate with the cross-attention as a heat map, and stream generated text.
// Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SPECIAL = new Set(["</s>", "<s>", "<pad>", "<unk>"]);
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

// ------------------------------------------------------------------------------------ the API
async function api(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value || sessionStorage.getItem("aiayn-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const res = await fetch(path, body === undefined ? { headers, signal }
    : { method: "POST", headers, body: JSON.stringify(body), signal });
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
    if (res.status === 401) { $("key-box").hidden = false; $("api-key").focus(); }
    throw new Error(message);
  }
  return res;
}

function showError(el, err) {
  el.textContent = err ? String(err.message || err) : "";
  el.hidden = !err;
}

function token(piece) {  // a BPE piece as text: the word-start mark becomes nothing at the start
  return piece.replace(/^\u2581/, "").replace(/\u2581/g, " ") || "\u2423";
}

function viridis(x) {
  const t = Math.min(1, Math.max(0, x)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function bars(list, items, chosen) {  // items: [{label, value}], best first
  list.replaceChildren(...items.map((it) => {
    const li = document.createElement("li");
    if (it.label === chosen) li.className = "chosen";
    const tok = document.createElement("span"); tok.className = "tok"; tok.textContent = it.label;
    const bar = document.createElement("span"); bar.className = "bar";
    const fill = document.createElement("span"); fill.style.width = (100 * it.value).toFixed(1) + "%";
    bar.append(fill);
    const num = document.createElement("span"); num.className = "num"; num.textContent = it.value.toFixed(3);
    li.append(tok, bar, num);
    return li;
  }));
}

// ------------------------------------------------------------------------------- translation
let explained = null;      // the last /v1/explain answer
let activeRow = 0;
let translateSeq = 0;

async function translateNow() {
  const text = $("t-input").value;
  const seq = ++translateSeq;
  if (!text.trim()) { showError($("t-error"), "Type a sentence to translate."); return; }
  $("t-output").classList.add("busy");
  try {
    const res = await api("/v1/explain", { text, kinds: ["cross"], top_k: 5 });
    const data = await res.json();
    if (seq !== translateSeq) return;  // a newer request was sent meanwhile
    explained = data;
    showError($("t-error"), null);
    $("t-output").textContent = data.output;
    setupSelectors(data.attention.cross);
    drawHeatmap();
  } catch (err) {
    if (seq === translateSeq) showError($("t-error"), err);
  } finally {
    if (seq === translateSeq) $("t-output").classList.remove("busy");
  }
}

function setupSelectors(cross) {
  const layer = $("layer"), head = $("head");
  const keepLayer = layer.value, keepHead = head.value;
  layer.replaceChildren(...cross.layers.map((l) => new Option(String(l + 1), String(l))));
  head.replaceChildren(new Option("mean of heads", "mean"), ...cross.heads.map((h) => new Option(String(h + 1), String(h))));
  layer.value = cross.layers.map(String).includes(keepLayer) ? keepLayer : String(cross.layers[cross.layers.length - 1]);
  head.value = keepHead && [...head.options].some((o) => o.value === keepHead) ? keepHead : "mean";
}

function currentMap() {  // -> {rows, cols, w: rows x cols} after the layer/head choice and hiding specials
  const cross = explained.attention.cross;
  const li = cross.layers.indexOf(Number($("layer").value));
  const heads = cross.weights[li];
  const hv = $("head").value;
  const pick = hv === "mean" ? heads : [heads[cross.heads.indexOf(Number(hv))]];
  const hide = $("hide-special").checked;
  const rows = cross.rows.map((p, i) => i).filter((i) => !(hide && SPECIAL.has(cross.rows[i])));
  const cols = cross.cols.map((p, j) => j).filter((j) => !(hide && SPECIAL.has(cross.cols[j])));
  const w = rows.map((i) => cols.map((j) => pick.reduce((s, h) => s + h[i][j], 0) / pick.length));
  return { rows: rows.map((i) => cross.rows[i]), cols: cols.map((j) => cross.cols[j]), w };
}

function drawHeatmap() {
  if (!explained) return;
  $("attn").hidden = false;
  const m = currentMap();
  const table = $("heat");
  const head = document.createElement("thead"), hr = document.createElement("tr");
  hr.append(document.createElement("th"));
  m.cols.forEach((c) => { const th = document.createElement("th"); th.scope = "col"; th.textContent = token(c); hr.append(th); });
  head.append(hr);
  const body = document.createElement("tbody");
  m.rows.forEach((r, i) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.dataset.row = String(i);
    tr.setAttribute("aria-label", `${token(r)}: attends most to ${token(m.cols[argmax(m.w[i])] || "")}`);
    const th = document.createElement("th"); th.scope = "row"; th.textContent = token(r); tr.append(th);
    m.w[i].forEach((v, j) => {
      const td = document.createElement("td");
      td.style.background = viridis(v);
      td.title = `${token(r)} → ${token(m.cols[j])}: ${v.toFixed(3)}`;
      tr.append(td);
    });
    tr.addEventListener("mouseenter", () => focusRow(i, m));
    tr.addEventListener("focus", () => focusRow(i, m));
    tr.addEventListener("keydown", (e) => {
      const next = e.key === "ArrowDown" ? i + 1 : e.key === "ArrowUp" ? i - 1 : null;
      if (next === null) return;
      e.preventDefault();
      const rowsEl = body.children;
      if (next >= 0 && next < rowsEl.length) rowsEl[next].focus();
    });
    body.append(tr);
  });
  table.replaceChildren(head, body);
  focusRow(Math.min(activeRow, m.rows.length - 1), m);
}

function argmax(xs) { let b = 0; xs.forEach((x, i) => { if (x > xs[b]) b = i; }); return b; }

function focusRow(i, m) {
  if (i < 0) { $("focus-title").textContent = "—"; $("focus-list").replaceChildren(); return; }
  activeRow = i;
  const rows = $("heat").tBodies[0].rows;
  [...rows].forEach((tr, k) => tr.classList.toggle("active", k === i));
  const best = argmax(m.w[i]);
  [...$("heat").tHead.rows[0].cells].forEach((th, k) => th.classList.toggle("hi", k === best + 1));
  $("focus-title").textContent = `“${token(m.rows[i])}” attends to`;
  const items = m.cols.map((c, j) => ({ label: token(c), value: m.w[i][j] }))
    .sort((a, b) => b.value - a.value).slice(0, 10);
  bars($("focus-list"), items, token(m.cols[best]));
}

let debounce = null;
$("t-input").addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(translateNow, 600);
});
$("t-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("t-form").requestSubmit(); }
});
$("t-form").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(debounce); translateNow(); });
["layer", "head", "hide-special"].forEach((id) => $(id).addEventListener("change", drawHeatmap));

// -------------------------------------------------------------------------------- generation
let controller = null;
let steps = [];            // per generated token: {text, top}
let activeStep = -1;

$("temp").addEventListener("input", () => { $("temp-value").textContent = Number($("temp").value).toFixed(2); });

function showStep(i) {
  if (i < 0 || i >= steps.length) return;
  activeStep = i;
  const spans = $("g-output").querySelectorAll(".t");
  spans.forEach((s, k) => s.classList.toggle("active", k === i));
  const s = steps[i];
  $("top-title").textContent = `step ${i + 1}: “${visible(s.text)}”`;
  bars($("top-list"), s.top.map((t) => ({ label: visible(t.text), value: Math.exp(t.logprob) })), visible(s.text));
}

function visible(text) { return text.replace(/\n/g, "\u23ce").replace(/ /g, "\u2423") || "\u2205"; }

function parseEvents(buffer, onEvent) {  // server-sent events: "data: ...\n\n"; returns the unparsed rest
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const chunk = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (data) onEvent(data);
  }
  return buffer;
}

async function generate() {
  if (controller) return;
  const out = $("g-output");
  const prompt = $("g-input").value;
  const maxTokens = Number($("max-tokens").value);
  showError($("g-error"), null);
  if (!(maxTokens >= 1)) { showError($("g-error"), "tokens must be at least 1"); return; }
  steps = []; activeStep = -1;
  const p = document.createElement("span"); p.className = "prompt"; p.textContent = prompt;
  out.replaceChildren(p);
  $("top-list").replaceChildren(); $("top-title").textContent = "next-token probabilities";
  controller = new AbortController();
  $("g-start").disabled = true; $("g-stop").disabled = false;
  const t0 = performance.now();
  let finish = null;
  $("g-status").textContent = "generating…";
  try {
    const res = await api("/v1/generate", { prompt, max_new_tokens: maxTokens, stream: true,
      temperature: Number($("temp").value), top_n_tokens: 10 }, controller.signal);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (data) => {
        if (data === "[DONE]") return;
        const ev = JSON.parse(data);
        if (ev.error) throw new Error(ev.error);
        const span = document.createElement("span");
        span.className = "t"; span.textContent = ev.token.text; span.dataset.step = String(steps.length);
        steps.push({ text: ev.token.text, top: ev.top_tokens });
        out.append(span);
        out.scrollTop = out.scrollHeight;
        if (ev.details) finish = ev.details.finish_reason;
        $("g-status").textContent = `${steps.length} tokens · ${(1000 * steps.length / (performance.now() - t0)).toFixed(0)} tokens/s`;
      });
    }
    $("g-status").textContent += finish ? ` · finished: ${finish}` : "";
  } catch (err) {
    if (err.name === "AbortError") $("g-status").textContent += " · stopped";
    else showError($("g-error"), err);
  } finally {
    controller = null;
    $("g-start").disabled = false; $("g-stop").disabled = true;
    if (steps.length && activeStep < 0) showStep(steps.length - 1);
  }
}

$("g-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("g-stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("g-output").tabIndex = 0;
$("g-output").setAttribute("aria-label", "generated text; left and right arrows move between tokens");
$("g-output").addEventListener("mouseover", (e) => { if (e.target.dataset.step) showStep(Number(e.target.dataset.step)); });
$("g-output").addEventListener("keydown", (e) => {
  const d = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
  if (!d || !steps.length) return;
  e.preventDefault();
  showStep(Math.min(steps.length - 1, Math.max(0, (activeStep < 0 ? steps.length : activeStep) + d)));
});
$("key-box").addEventListener("submit", (e) => { e.preventDefault(); translateNow(); });
$("api-key").addEventListener("change", () => sessionStorage.setItem("aiayn-key", $("api-key").value));

// ---------------------------------------------------------------------------------- start-up
(async function start() {
  try {
    const data = await (await api("/v1/models")).json();
    const t = data.data.find((m) => m.task === "translation"), lm = data.data.find((m) => m.task === "lm");
    $("models").textContent = data.data.map((m) => `${m.id} (${m.task}, ${(m.parameters / 1e6).toFixed(1)}M parameters)`).join(" · ");
    if (t) { $("langs").textContent = `${t.source} → ${t.target} · ${t.id}`; translateNow(); }
    if (lm) $("lm-name").textContent = `· ${lm.id}`;
  } catch (err) {
    $("models").textContent = "";
    showError($("t-error"), err);
  }
})();

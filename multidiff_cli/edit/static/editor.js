// multidiff edit: the page. The scene file on disk is the source of truth: every change goes to the
// server, which validates it as `multidiff validate` does and writes it when valid. No network but the
// editor's own address, no library.
"use strict";

const token = document.querySelector('meta[name="multidiff-token"]').content;
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

let snap = null;       // the server's last word on the file (its digest `base`, problems, what to draw)
let scene = null;      // the page's copy of the scene data, changed by the user
let regionIds = [];    // a stable id per region of `scene`
let savedIds = [];     // the ids of the regions as the file holds them (their order there)
let nextId = 1;
let selected = null;   // index of the selected region
let scale = 1;         // screen px per scene px
let saveTimer = null, saving = false, again = false;

function api(path, options = {}) {
  const headers = Object.assign({"X-Multidiff-Token": token}, options.headers || {});
  return fetch(path, Object.assign({}, options, {headers}));
}

function regions() { return scene && Array.isArray(scene.regions) ? scene.regions : []; }
function canvasSize() {
  const [w, h] = snap ? snap.canvas : [512, 512];
  const number = (v, d) => (Number.isInteger(v) && v >= 64 && v <= 8192 ? v : d);
  return scene ? [number(scene.width, w), number(scene.height, h)] : [w, h];
}
function isBox(box) { return Array.isArray(box) && box.length === 4 && box.every(Number.isFinite); }

// --- the file ---------------------------------------------------------------------------------------------

function accept(answer, note) {
  snap = answer;
  scene = answer.data ? structuredClone(answer.data) : null;
  regionIds = regions().map(() => nextId++);
  savedIds = regionIds.slice();
  if (selected !== null && selected >= regions().length) selected = null;
  $("#file").textContent = answer.file;
  $("#snap").textContent = answer.snap_px;
  status(note || (answer.valid ? "saved" : "the file has problems"), answer.valid && !note ? "ok" : (answer.valid ? "" : "bad"));
  drawAll(true);
  showProblems(answer.problems, answer.warnings);
}

function changed(delay = 0) {
  clearTimeout(saveTimer);
  status("…", "");
  saveTimer = setTimeout(save, delay);
}

async function save() {
  if (saving) { again = true; return; }
  if (!scene) return;
  saving = true;
  const sentIds = regionIds.slice();
  const body = {base: snap.base, scene, regions_from: regionIds.map(id => { const k = savedIds.indexOf(id); return k < 0 ? null : k; })};
  try {
    const response = await api("api/scene", {method: "PUT", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const answer = await response.json();
    if (response.status === 200) {
      const local = scene, ids = regionIds;
      snap = answer;
      savedIds = sentIds;
      if (again) { scene = local; regionIds = ids; }  // newer edits wait for the next save
      else { scene = structuredClone(answer.data); regionIds = sentIds; }
      status(answer.written ? "saved" : "no change", "ok");
      drawAll(true);
      showProblems([], answer.warnings);
    } else if (response.status === 409) {
      accept(answer, "changed on disk: reloaded");
    } else {
      status("not saved: see the problems", "bad");
      showProblems(answer.problems || [{message: "the editor refused the change"}], []);
      drawAll(false);
    }
  } catch (error) {
    status("not saved: the editor does not answer (stopped?)", "bad");
  } finally {
    saving = false;
    if (again) { again = false; save(); }
  }
}

function status(text, kind) {
  const saved = $("#saved");
  saved.textContent = text;
  saved.className = kind;
}

function showProblems(problems, warnings) {
  $$(".problem").forEach(node => { node.textContent = ""; });
  $$(".bad").forEach(node => node.classList.remove("bad"));
  const general = [];
  for (const problem of problems) {
    const at = problem.field && $(`.problem[data-for="${CSS.escape(problem.field)}"]`);
    if (at) at.textContent += (at.textContent ? " " : "") + problem.message;
    else general.push(problem.text || problem.message);
    const region = problem.field && /^regions\[(\d+)\]/.exec(problem.field);
    if (region) $$(`[data-region="${region[1]}"]`).forEach(node => node.classList.add("bad"));
  }
  $("#problems").replaceChildren(...general.map(text => Object.assign(document.createElement("div"), {textContent: text})));
  $("#warnings").replaceChildren(...(warnings || []).map(text => Object.assign(document.createElement("div"), {textContent: text})));
}

// --- drawing ----------------------------------------------------------------------------------------------

function layout() {
  const [w, h] = canvasSize();
  const stage = $("#stage");
  const room = [stage.clientWidth - 32, stage.clientHeight - 110];
  scale = Math.max(0.05, Math.min(room[0] / w, room[1] / h, 2));
  const canvas = $("#canvas");
  canvas.style.width = `${Math.round(w * scale)}px`;
  canvas.style.height = `${Math.round(h * scale)}px`;
}

function colour(i) { const colours = snap ? snap.colours : ["#4e79a7"]; return colours[i % colours.length]; }

function place(node, box) {
  const [x0, y0, x1, y1] = box;
  Object.assign(node.style, {left: `${x0 * scale}px`, top: `${y0 * scale}px`,
                             width: `${(x1 - x0) * scale}px`, height: `${(y1 - y0) * scale}px`});
}

function drawAll(rebuildPanel) {
  layout();
  const layers = $("#layers");
  layers.replaceChildren();
  regions().forEach((region, i) => {
    const saved = savedIds.indexOf(regionIds[i]);
    const mask = snap && saved >= 0 ? snap.masks[String(saved)] : null;
    if (region && isBox(region.box)) {
      const box = document.createElement("div");
      box.className = "box" + (i === selected ? " selected" : "");
      box.dataset.index = i;
      box.dataset.region = i;
      box.style.borderColor = colour(i);
      box.style.background = colour(i) + "33";
      place(box, region.box);
      box.append(Object.assign(document.createElement("span"), {className: "number", textContent: String(i + 1)}));
      for (const edge of ["nw", "n", "ne", "e", "se", "s", "sw", "w"]) {
        const handle = document.createElement("div");
        handle.className = "handle";
        handle.dataset.edge = edge;
        handle.style.left = edge.includes("w") ? "0%" : edge.includes("e") ? "100%" : "50%";
        handle.style.top = edge.includes("n") ? "0%" : edge.includes("s") ? "100%" : "50%";
        box.append(handle);
      }
      layers.append(box);
    } else if (region && typeof region.mask === "string" && mask && saved >= 0 && region.mask === savedMask(saved)) {
      if (mask.overlay) {
        const img = document.createElement("img");
        img.className = "overlay";
        img.alt = "";
        img.src = `api/overlay/${saved}?token=${encodeURIComponent(token)}&v=${snap.base}`;
        layers.append(img);
      }
      if (mask.bbox) {
        const outline = document.createElement("div");
        outline.className = "mask-outline";
        outline.dataset.region = i;
        outline.style.borderColor = colour(i);
        place(outline, mask.bbox);
        outline.append(Object.assign(document.createElement("span"), {className: "number", textContent: String(i + 1)}));
        layers.append(outline);
      }
    }
  });
  const init = $("#init");
  const wanted = snap && snap.init_image ? `api/picture?path=${encodeURIComponent(snap.init_image)}&token=${encodeURIComponent(token)}` : "";
  if (init.getAttribute("src") !== wanted) init.setAttribute("src", wanted);
  if (rebuildPanel) buildPanel();
  fillFields();
}

function savedMask(k) {
  const data = snap && snap.data && Array.isArray(snap.data.regions) ? snap.data.regions[k] : null;
  return data ? data.mask : null;
}

// --- the panel --------------------------------------------------------------------------------------------

function buildPanel() {
  const list = $("#regions");
  list.replaceChildren();
  regions().forEach((region, i) => {
    const card = document.createElement("fieldset");
    card.dataset.region = i;
    card.className = i === selected ? "selected" : "";
    const where = region && isBox(region.box) ? `box [${region.box.join(", ")}]` : region && region.mask ? `mask ${region.mask}` : "";
    card.innerHTML = `
      <legend><span class="swatch"></span> Region ${i + 1}</legend>
      <label>Prompt <textarea rows="2" data-field="regions[${i}].prompt"></textarea></label>
      <div class="problem" data-for="regions[${i}].prompt"></div>
      <label>Negative prompt <textarea rows="1" data-field="regions[${i}].negative_prompt" data-optional="1" placeholder="the scene's"></textarea></label>
      <div class="problem" data-for="regions[${i}].negative_prompt"></div>
      <label>Guidance <input data-field="regions[${i}].guidance_scale" data-kind="float" data-optional="1" inputmode="decimal" placeholder="the scene's"></label>
      <div class="problem" data-for="regions[${i}].guidance_scale"></div>
      <div class="where"></div>
      <div class="problem" data-for="regions[${i}].box"></div>
      <div class="problem" data-for="regions[${i}].mask"></div>
      <div class="problem" data-for="regions[${i}]"></div>
      <div class="row buttons"><button type="button" data-action="delete">Delete region ${i + 1}</button></div>`;
    $(".swatch", card).style.background = colour(i);
    $(".where", card).textContent = where;
    card.addEventListener("pointerdown", () => select(i, false));
    $('[data-action="delete"]', card).addEventListener("click", () => removeRegion(i));
    list.append(card);
  });
  $$("[data-field]").forEach(input => { input.oninput = () => edited(input); });
}

function pathOf(field) {
  return field.replace(/\[(\d+)\]/g, ".$1").split(".").map(part => (/^\d+$/.test(part) ? Number(part) : part));
}

function valueAt(field) {
  let node = scene;
  for (const part of pathOf(field)) { if (node === null || typeof node !== "object") return undefined; node = node[part]; }
  return node;
}

function fillFields() {
  $$("[data-field]").forEach(input => {
    if (input === document.activeElement) return;
    const value = valueAt(input.dataset.field);
    input.value = value === undefined || value === null ? "" : String(value);
  });
  regions().forEach((region, i) => {
    const where = $(`fieldset[data-region="${i}"] .where`);
    if (where) where.textContent = region && isBox(region.box) ? `box [${region.box.join(", ")}]` : region && region.mask ? `mask ${region.mask}` : "";
  });
}

function edited(input) {
  if (!scene) { status("the file does not read as a scene: fix it in a text editor", "bad"); return; }
  const parts = pathOf(input.dataset.field);
  const key = parts.pop();
  let owner = scene;
  for (const part of parts) owner = owner[part];
  const raw = input.value;
  const kind = input.dataset.kind;
  if (raw.trim() === "" && input.dataset.optional) delete owner[key];
  else if (kind === "int" && /^\s*-?\d+\s*$/.test(raw)) owner[key] = parseInt(raw, 10);
  else if (kind === "float" && raw.trim() !== "" && Number.isFinite(Number(raw))) owner[key] = Number(raw);
  else owner[key] = raw;  // validation says what is wrong with it
  if (key === "width" || key === "height") drawAll(false);
  changed(kind ? 300 : 600);
}

// --- the mouse --------------------------------------------------------------------------------------------

function snapTo(value) { const step = snap ? snap.snap_px : 8; return Math.round(value / step) * step; }
function clamp(value, low, high) { return Math.min(high, Math.max(low, value)); }

function select(i, focus) {
  selected = i;
  $$(".box").forEach(node => node.classList.toggle("selected", Number(node.dataset.index) === i));
  $$("#regions fieldset").forEach(node => node.classList.toggle("selected", Number(node.dataset.region) === i));
  if (focus) { const prompt = $(`[data-field="regions[${i}].prompt"]`); if (prompt) { prompt.focus(); prompt.select(); } }
}

function removeRegion(i) {
  if (!scene || !Array.isArray(scene.regions)) return;
  scene.regions.splice(i, 1);
  regionIds.splice(i, 1);
  selected = null;
  drawAll(true);
  changed(0);
}

function scenePoint(event) {
  const rect = $("#canvas").getBoundingClientRect();
  return [(event.clientX - rect.left) / scale, (event.clientY - rect.top) / scale];
}

function startDrag(event) {
  if (!scene || event.button !== 0) return;
  const [w, h] = canvasSize();
  const target = event.target;
  const boxNode = target.closest(".box");
  const start = scenePoint(event);
  let move;
  if (boxNode) {
    const i = Number(boxNode.dataset.index);
    const original = regions()[i].box.slice();
    const edge = target.classList.contains("handle") ? target.dataset.edge : null;
    select(i, false);
    move = point => {
      const dx = point[0] - start[0], dy = point[1] - start[1];
      let [x0, y0, x1, y1] = original;
      const step = snap ? snap.snap_px : 8;
      if (!edge) {
        const sx = clamp(snapTo(dx), -x0, w - x1), sy = clamp(snapTo(dy), -y0, h - y1);
        [x0, y0, x1, y1] = [x0 + sx, y0 + sy, x1 + sx, y1 + sy];
      } else {
        if (edge.includes("w")) x0 = clamp(snapTo(x0 + dx), 0, x1 - step);
        if (edge.includes("e")) x1 = clamp(snapTo(x1 + dx), x0 + step, w);
        if (edge.includes("n")) y0 = clamp(snapTo(y0 + dy), 0, y1 - step);
        if (edge.includes("s")) y1 = clamp(snapTo(y1 + dy), y0 + step, h);
      }
      regions()[i].box = [x0, y0, x1, y1];
      place(boxNode, regions()[i].box);
      return original.some((v, k) => v !== regions()[i].box[k]);
    };
  } else {
    if (!Array.isArray(scene.regions)) scene.regions = [];
    const ghost = document.createElement("div");
    ghost.className = "box";
    ghost.style.borderColor = colour(scene.regions.length);
    $("#layers").append(ghost);
    let box = null;
    move = point => {
      const a = [clamp(snapTo(start[0]), 0, w), clamp(snapTo(start[1]), 0, h)];
      const b = [clamp(snapTo(point[0]), 0, w), clamp(snapTo(point[1]), 0, h)];
      box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
      place(ghost, box);
      return box[2] > box[0] && box[3] > box[1];
    };
    move.finish = ok => {
      ghost.remove();
      if (!ok) return;
      scene.regions.push({prompt: `region ${scene.regions.length + 1}`, box});
      regionIds.push(nextId++);
      selected = scene.regions.length - 1;
      drawAll(true);
      select(selected, true);
    };
  }
  const canvas = $("#canvas");
  canvas.setPointerCapture(event.pointerId);
  let moved = false;
  const onMove = e => { moved = move(scenePoint(e)) || false; };
  const onUp = e => {
    canvas.removeEventListener("pointermove", onMove);
    canvas.removeEventListener("pointerup", onUp);
    canvas.removeEventListener("pointercancel", onUp);
    moved = move(scenePoint(e)) || false;
    if (move.finish) move.finish(moved);
    else fillFields();
    if (moved) changed(0);
  };
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  canvas.addEventListener("pointercancel", onUp);
  event.preventDefault();
  canvas.focus();
}

document.addEventListener("keydown", event => {
  const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement && document.activeElement.tagName);
  if (!typing && selected !== null && (event.key === "Delete" || event.key === "Backspace")) {
    removeRegion(selected);
    event.preventDefault();
  }
});

// --- uploads and the render button ------------------------------------------------------------------------

async function upload(kind, file) {
  const response = await api(`api/upload?kind=${kind}&name=${encodeURIComponent(file.name)}`, {method: "POST", body: file});
  const answer = await response.json();
  if (!answer.ok) { showProblems([{field: kind === "mask" ? null : "init_image", message: answer.message, text: answer.message}], []); return null; }
  return answer.path;
}

function onFile(input, use) {
  input.addEventListener("change", async () => {
    const file = input.files[0];
    input.value = "";
    if (!file || !scene) return;
    const path = await upload(input.id === "mask-file" ? "mask" : "init_image", file);
    if (path) { use(path); drawAll(true); changed(0); }
  });
}

// --- the preview stream -----------------------------------------------------------------------------------

function previewState(text, off) {
  const node = $("#preview-state");
  node.textContent = text;
  node.classList.toggle("off", Boolean(off));
}

function listen() {
  const events = new EventSource(`api/events?token=${encodeURIComponent(token)}`);
  const on = (kind, handle) => events.addEventListener(kind, message => handle(JSON.parse(message.data)));
  on("step", event => { $("#picture").src = event.image; previewState(`preview: step ${event.step}/${event.steps}`); });
  on("final", event => { $("#picture").src = event.image; previewState(`preview: ${event.steps} step${event.steps === 1 ? "" : "s"} on ${event.model}, seed ${event.seed}`); });
  on("state", event => previewState(event.text));
  on("off", event => previewState(event.reason, true));
  on("problem", event => previewState(event.lines.join(" "), true));
  on("reloaded", event => { if (!snap || event.base !== snap.base) accept(event, "changed on disk: reloaded"); });
  on("render-step", event => { $("#render-state").textContent = `rendering: step ${event.step}/${event.steps}`; });
  on("render-note", event => { $("#render-state").textContent = event.text; });
  on("written", event => { $("#render-state").textContent = `rendered ${event.path}`; });
  on("render-failed", event => { $("#render-state").textContent = event.lines.join(" "); });
  events.onerror = () => previewState("the editor does not answer (stopped?)", true);
}

async function start() {
  const canvas = $("#canvas");
  canvas.addEventListener("pointerdown", startDrag);
  window.addEventListener("resize", () => drawAll(false));
  $("#render").addEventListener("click", async () => {
    $("#render-state").textContent = "render queued";
    await api("api/render", {method: "POST"});
  });
  $("#add-mask").addEventListener("click", () => $("#mask-file").click());
  $("#add-init").addEventListener("click", () => $("#init-file").click());
  onFile($("#mask-file"), path => {
    if (!Array.isArray(scene.regions)) scene.regions = [];
    scene.regions.push({prompt: `region ${scene.regions.length + 1}`, mask: path});
    regionIds.push(nextId++);
  });
  onFile($("#init-file"), path => { scene.init_image = path; });
  const response = await api("api/scene");
  accept(await response.json());
  listen();
}

start();

// The Ray view: fills airflow_ray/ui/page.html from the JSON endpoints of airflow_ray/ui/api.py.
// Data goes into the page through textContent and SVG attributes only, never as HTML.
"use strict";

const body = document.body.dataset;
const api = `${body.base}/api`;
const runPath = `${encodeURIComponent(body.dagId)}/${encodeURIComponent(body.runId)}`;
const SVG = "http://www.w3.org/2000/svg";

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
  tbody.append(tr);
}

async function getJSON(url, options) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`${response.status}: ${data.detail || response.statusText}`);
  return data;
}

function showError(section, error) {
  document.getElementById(section).append(el("p", String(error.message || error), "error"));
}

function shape(output) {
  if (output.shape) return output.shape.join(" × ");
  if (output.rows !== undefined && output.rows !== null) return `${output.rows} rows`;
  return "";
}

function checkpointCell(output) {
  const td = el("td");
  if (!output.checkpoint_uri) { td.append(el("span", "none", "muted")); return td; }
  td.append(el("span", output.checkpoint_uri), el("br"));
  const verdict = el("span", output.checkpoint, output.checkpoint === "verified" ? "good" : "bad");
  if (output.checkpoint_problem) verdict.title = output.checkpoint_problem;
  td.append(verdict);
  return td;
}

async function loadRun() {
  const run = await getJSON(`${api}/runs/${runPath}`);
  const t = run.totals;
  const totals = document.getElementById("totals");
  totals.replaceChildren(
    el("span", `${t.outputs} outputs`),
    el("span", `${t.object_store} in the object store (${bytes(t.object_store_bytes)})`),
    el("span", `${t.inline} inline in the XCom table (${bytes(t.inline_bytes)})`),
    el("span", `${t.not_held} not held`),
    el("span", `${t.checkpoints_verified} of ${t.checkpointed} checkpoints verified`),
  );
  const tbody = document.querySelector("#outputs tbody");
  tbody.replaceChildren();
  for (const o of run.outputs) {
    const where = el("td", o.where, o.where === "object store" || o.where === "inline" ? "" : "bad");
    if (o.problem) where.title = o.problem;
    const node = o.node ? `${o.node.slice(0, 12)}… ${o.node_address || ""}` : o.node_address || "";
    row(tbody, [o.task_id, o.map_index, o.key, o.type || "", shape(o), el("td", bytes(o.bytes), "num"),
      where, node, checkpointCell(o)]);
  }
  document.getElementById("run").hidden = false;
}

function chart(runs) {
  const box = document.getElementById("chart");
  if (!runs.length) { box.replaceChildren(el("p", "No run holds objects in Ray.", "muted")); return; }
  const barHeight = 20, labelWidth = 420, width = 960, gap = 4;
  const max = Math.max(...runs.map((r) => r.bytes), 1);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("id", "store-chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", runs.length * (barHeight + gap));
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "object store use per DAG run");
  runs.forEach((r, i) => {
    const y = i * (barHeight + gap);
    const current = r.dag_id === body.dagId && r.run_id === body.runId;
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 0);
    label.setAttribute("y", y + 14);
    label.textContent = `${r.dag_id} / ${r.run_id}`;
    const bar = document.createElementNS(SVG, "rect");
    const w = Math.max(1, ((width - labelWidth - 110) * r.bytes) / max);
    bar.setAttribute("x", labelWidth);
    bar.setAttribute("y", y);
    bar.setAttribute("width", w);
    bar.setAttribute("height", barHeight);
    bar.setAttribute("fill", current ? "#dd6b20" : "#3182ce");
    bar.setAttribute("class", "run-bar");
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${r.objects} objects, ${bytes(r.bytes)}`;
    bar.append(title);
    const value = document.createElementNS(SVG, "text");
    value.setAttribute("x", labelWidth + w + 6);
    value.setAttribute("y", y + 14);
    value.textContent = bytes(r.bytes);
    svg.append(label, bar, value);
  });
  box.replaceChildren(svg);
}

async function loadCluster() {
  const c = await getJSON(`${api}/cluster`);
  chart(c.runs);
  const store = c.object_store;
  const summary = document.getElementById("summary");
  summary.replaceChildren(el("span", `${c.address}. `));
  summary.append(store.unavailable ? el("span", `Object store: ${store.unavailable}. `, "muted")
    : el("span", `Object store: ${bytes(store.used_bytes)} used of ${bytes(store.capacity_bytes)}, `
      + `${store.objects} objects, ${bytes(store.spilled_bytes)} spilled to disk. `));
  if (c.dashboard_url) {
    const link = el("a", "Ray dashboard");
    link.href = c.dashboard_url;
    link.target = "_blank";
    link.rel = "noopener";
    summary.append(link);
  } else {
    summary.append(el("span", "No Ray dashboard configured.", "muted"));
  }
  const nodes = document.querySelector("#nodes tbody");
  nodes.replaceChildren();
  for (const n of c.nodes) {
    row(nodes, [n.id.slice(0, 12) + "…", n.address, el("td", n.alive ? "yes" : "no", n.alive ? "good" : "bad"),
      n.cpus, n.gpus, bytes(n.memory_bytes), bytes(n.object_store_bytes)]);
  }
  const owners = document.querySelector("#owners tbody");
  owners.replaceChildren();
  for (const o of c.owners) {
    const health = el("td", o.healthy ? "answering" : o.error, o.healthy ? "good" : "bad");
    const name = o.this_version ? o.name : `${o.name} (another version)`;
    row(owners, [name, health, o.objects ?? "", el("td", bytes(o.bytes), "num"), o.runs ?? "", o.tasks_in_flight ?? ""]);
  }
  if (!c.owners.length) row(owners, ["none yet: the first task creates them", "", "", "", "", ""]);
  const keepers = c.keepers.map((k) => `${k.name}${"starts" in k ? (k.ready ? ": ready" : `: NOT ready ${k.error || ""}`) : ""}`);
  document.getElementById("keepers").textContent = keepers.length ? keepers.join("; ")
    : "none: Ray tasks start a new worker process each until one runs (airflow-ray cluster prepare)";
}

async function free() {
  const button = document.getElementById("free");
  button.disabled = true;
  const freed = document.getElementById("freed");
  try {
    // The header tells the server this is the page's button, not a form posted from elsewhere.
    const result = await getJSON(`${api}/free/${runPath}`, { method: "POST", headers: { "X-Airflow-Ray-Request": "free" } });
    freed.textContent = `Freed ${result.freed_objects} objects (${bytes(result.freed_bytes)}).`;
    freed.className = "good";
    await Promise.all([loadRun(), loadCluster()]);
  } catch (error) {
    freed.textContent = `Not freed: ${error.message}`;
    freed.className = "bad";
  } finally {
    button.disabled = false;
  }
}

if (body.dagId) {
  document.getElementById("free").addEventListener("click", free);
  loadRun().catch((error) => { document.getElementById("run").hidden = false; showError("run", error); });
}
loadCluster().catch((error) => showError("cluster", error));

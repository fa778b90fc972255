// Persona's device model in the browser: the session's edit comes from the server (compact float16 bytes), the
// ONNX model runs here with onnxruntime-web, the ranking never leaves the page. The page URL takes
// ?session=ID[&k=10][&api=BASE][&key=API_KEY][&report=URL][&observe=JSON]; with `report` it POSTs its top-k there
// as JSON (tests); `observe` is a JSON array of item ids the user chose on this page, oldest first (sent as events
// and counted here, as a page calls observe() on each choice). The edit layout and the graph's inputs:
// docs/device.md.

const params = new URLSearchParams(location.search);
const api = (params.get("api") || "").replace(/\/$/, "");
const session = params.get("session");
const k = Number(params.get("k") || 10);
const key = params.get("key");

async function get(path, kind) {
  const headers = key ? { "X-API-Key": key } : {};
  const response = await fetch(api + path, { headers }); // the browser's cache revalidates with the ETag (304)
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return kind === "json" ? response.json() : response.arrayBuffer();
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

// The binary edit layout (docs/device.md): 32-byte header, model version, arrays 4-byte aligned.
export function decodeEdit(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== "PEDT" || view.getUint16(4, true) !== 1) throw new Error("not a Persona edit this page can read");
  const dtype = view.getUint8(6), flags = view.getUint8(7);
  const L = view.getUint16(8, true), D = view.getUint16(10, true), r = view.getUint16(12, true);
  const m = view.getUint16(14, true), N = view.getUint32(16, true);
  const modelVersion = new TextDecoder().decode(new Uint8Array(buffer, 32, m));
  let pos = 32 + m + ((4 - (m % 4)) % 4);
  const width = dtype === 1 ? 2 : 4;
  const take = (count) => {
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      out[i] = width === 2 ? halfToFloat(view.getUint16(pos + 2 * i, true)) : view.getFloat32(pos + 4 * i, true);
    }
    pos += count * width;
    pos += (4 - (pos % 4)) % 4;
    return out;
  };
  let weight;
  if (flags & 1) { // low-rank: ΔW_l = U_l V_l
    const u = take(L * D * r), v = take(L * r * D);
    weight = new Float32Array(L * D * D);
    for (let l = 0; l < L; l++)
      for (let i = 0; i < D; i++)
        for (let j = 0; j < D; j++) {
          let s = 0;
          for (let q = 0; q < r; q++) s += u[(l * D + i) * r + q] * v[(l * r + q) * D + j];
          weight[(l * D + i) * D + j] = s;
        }
  } else {
    weight = take(L * D * D);
  }
  const bias = take(L * D);
  const itemBias = flags & 2 ? take(N) : null;
  return { modelVersion, editVersion: Number(view.getBigUint64(24, true)), prototype: view.getInt32(20, true),
           L, D, weight, bias, itemBias };
}

// The session's whole-history item counts (models with a repeat part): the server's rule, line for line
// (recsys/repeats.py). An entry is [count, last, decayedShort, decayedLong]; a new item always gets in, evicting the
// entry with the fewest occurrences, the oldest latest occurrence among equals; entries keep the order they entered.
export class RepeatCounts {
  constructor(size, decays) {
    this.size = size;
    this.decays = decays;
    this.table = new Map(); // item id -> entry, in the order entries entered
    this.n = 0; // events counted
  }

  add(item) {
    const [short, long] = this.decays;
    const entry = this.table.get(item);
    if (entry === undefined) {
      if (this.table.size >= this.size) {
        let worst = null;
        for (const [key, e] of this.table) {
          if (worst === null || e[0] < worst[1][0] || (e[0] === worst[1][0] && e[1] < worst[1][1])) worst = [key, e];
        }
        this.table.delete(worst[0]);
      }
      this.table.set(item, [1, this.n, 1.0, 1.0]);
    } else {
      const gap = this.n - entry[1];
      entry[0] += 1;
      entry[1] = this.n;
      entry[2] = entry[2] * short ** gap + 1.0;
      entry[3] = entry[3] * long ** gap + 1.0;
    }
    this.n += 1;
  }

  // repeat_entries of the session, float32 [size * 5]: (item index, count, age, decayed short, decayed long) per
  // entry in table order; items the vocabulary does not know are left out, empty rows are 0
  encode(index) {
    const [short, long] = this.decays;
    const out = new Float32Array(this.size * 5);
    let j = 0;
    for (const [item, [count, last, ds, dl]] of this.table) {
      const code = index.get(item);
      if (code === undefined || code <= 1 || j >= this.size) continue;
      const age = this.n - last;
      out.set([code, count, age, ds * short ** (age - 1), dl * long ** (age - 1)], 5 * j);
      j += 1;
    }
    return out;
  }

  toJSON() {
    return { n: this.n, items: Array.from(this.table, ([item, e]) => [item, ...e]) };
  }

  static fromJSON(data, size, decays) {
    const out = new RepeatCounts(size, decays);
    out.n = data.n;
    for (const [item, count, last, ds, dl] of data.items.slice(0, size)) out.table.set(item, [count, last, ds, dl]);
    return out;
  }
}

// This page's record of a session (localStorage): its item counts and the items observed but not counted yet
// (known only once the manifest says which items the model knows).
function loadLocal() {
  try {
    return JSON.parse(localStorage.getItem(`persona-session:${session}`)) || { counts: null, pending: [] };
  } catch {
    return { counts: null, pending: [] };
  }
}

function saveLocal(local) {
  localStorage.setItem(`persona-session:${session}`, JSON.stringify(local));
}

// The user chose these items on this page (oldest first): send them as events and keep them to count.
export async function observe(items) {
  if (!items.length) return;
  const stamp = Date.now();
  const events = items.map((item, n) => ({
    event_id: `${session}-web-${stamp}-${n}-${Math.random().toString(36).slice(2)}`,
    session_id: session,
    item_id: item,
    ts: stamp / 1000 + n * 1e-3,
  }));
  const headers = { "Content-Type": "application/json", ...(key ? { "X-API-Key": key } : {}) };
  const response = await fetch(`${api}/v1/events`, { method: "POST", headers, body: JSON.stringify({ events }) });
  if (!response.ok) throw new Error(`/v1/events: HTTP ${response.status} ${await response.text()}`);
  const local = loadLocal();
  local.pending.push(...items);
  saveLocal(local);
}

// The counts to rank with: this page's own, brought up to date with what it observed, when they are in step with
// the server's (same number of counted events); otherwise (events from another device, cleared storage) the
// server's stored counts, kept from now on; for a session stored without counts, its known recent items counted
// (the server's own rule for such a session).
function sessionCounts(state, manifest, index) {
  const { size, decays } = manifest.repeat;
  const local = loadLocal();
  let counts = local.counts ? RepeatCounts.fromJSON(local.counts, size, decays) : new RepeatCounts(size, decays);
  for (const item of local.pending) if (index.has(item)) counts.add(item);
  let source = "local";
  const stored = state.item_counts;
  if (!stored || stored.n !== counts.n) {
    source = stored ? "server" : "recent";
    counts = stored ? RepeatCounts.fromJSON(stored, size, decays) : new RepeatCounts(size, decays);
    if (!stored) state.recent_items.filter((i) => index.has(i)).forEach((i) => counts.add(i));
  }
  saveLocal({ counts: counts.toJSON(), pending: [] });
  return { counts, source };
}

function windowLength(n, maxLen, stride) {
  if (stride <= 0 || n <= maxLen) return Math.min(n, maxLen);
  return maxLen - stride + 1 + ((n - maxLen - 1) % stride);
}

export async function recommend() {
  await observe(JSON.parse(params.get("observe") || "[]"));
  const state = await get(`/v1/sessions/${encodeURIComponent(session)}`, "json");
  const edit = decodeEdit(await get(`/v1/sessions/${encodeURIComponent(session)}/edit?format=binary`));
  const version = encodeURIComponent(edit.modelVersion);
  const manifest = await get(`/v1/models/${version}/device/manifest`, "json");
  const graph = await ort.InferenceSession.create(await get(`/v1/models/${version}/device`), {
    executionProviders: ["wasm"],
  });
  const index = new Map(manifest.items.map((item, i) => [item, i + manifest.index_offset]));
  // the server's rules: known items only, the encoder's window of the session's event count, its last max_len seen
  const known = state.recent_items.filter((i) => index.has(i)).map((i) => index.get(i));
  const c = Math.min(windowLength(state.event_count, manifest.max_len, manifest.window_stride), known.length);
  const hist = new BigInt64Array(manifest.max_len);
  known.slice(known.length - c).forEach((v, j) => { hist[manifest.max_len - c + j] = BigInt(v); });
  // a model with a repeat part is there to recommend seen items: the server leaves them in by default
  const seenList = manifest.repeat ? [] : known.slice(-manifest.max_len);
  const seen = BigInt64Array.from(seenList.length ? seenList : [0], (v) => BigInt(v));
  const N = manifest.n_items;
  const feeds = {
    history: new ort.Tensor("int64", hist, [1, manifest.max_len]),
    seen: new ort.Tensor("int64", seen, [1, seen.length]),
    delta_weight: new ort.Tensor("float32", edit.weight, [1, edit.L, edit.D, edit.D]),
    delta_bias: new ort.Tensor("float32", edit.bias, [1, edit.L, edit.D]),
    item_bias: new ort.Tensor("float32", edit.itemBias || new Float32Array(N), [1, N]),
  };
  let counted = null;
  if (manifest.repeat) {
    const { counts, source } = sessionCounts(state, manifest, index);
    feeds.repeat_entries = new ort.Tensor("float32", counts.encode(index), [1, manifest.repeat.size, 5]);
    counted = source;
  }
  const { scores } = await graph.run(feeds, ["scores"]);
  const order = Array.from(scores.data.keys()).filter((i) => Number.isFinite(scores.data[i]));
  order.sort((a, b) => scores.data[b] - scores.data[a] || a - b);
  return {
    session,
    modelVersion: edit.modelVersion,
    editVersion: edit.editVersion,
    counts: counted, // where the repeat part's counts came from: "local", "server", "recent" (null: no repeat part)
    items: order.slice(0, k).map((i) => [manifest.items[i - manifest.index_offset], scores.data[i]]),
  };
}

async function main() {
  const status = document.getElementById("status");
  ort.env.wasm.numThreads = 1; // no cross-origin isolation needed
  ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;
  let result;
  try {
    result = await recommend();
    status.textContent = `session ${session}, model ${result.modelVersion}, edit ${result.editVersion}`;
    const body = document.querySelector("#items tbody");
    result.items.forEach(([item, score], n) => {
      const row = body.insertRow();
      [n + 1, item, score.toFixed(4)].forEach((v) => { row.insertCell().textContent = String(v); });
    });
  } catch (err) {
    status.textContent = `error: ${err.message || err}`;
    result = { session, error: String(err.message || err) };
  }
  const report = params.get("report");
  if (report) await fetch(report, { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify(result) });
}

main();

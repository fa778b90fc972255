// Persona's device model in the browser: the session's edit comes from the server (compact float16 bytes), the
// ONNX model runs here with onnxruntime-web, the ranking never leaves the page. The page URL takes
// ?session=ID[&k=10][&api=BASE][&key=API_KEY][&report=URL]; with `report` it POSTs its top-k there as JSON (tests).
// The layout of the edit and the graph's inputs: docs/device.md.

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

function windowLength(n, maxLen, stride) {
  if (stride <= 0 || n <= maxLen) return Math.min(n, maxLen);
  return maxLen - stride + 1 + ((n - maxLen - 1) % stride);
}

export async function recommend() {
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
  const seenList = known.slice(-manifest.max_len);
  const seen = BigInt64Array.from(seenList.length ? seenList : [0], (v) => BigInt(v));
  const N = manifest.n_items;
  const feeds = {
    history: new ort.Tensor("int64", hist, [1, manifest.max_len]),
    seen: new ort.Tensor("int64", seen, [1, seen.length]),
    delta_weight: new ort.Tensor("float32", edit.weight, [1, edit.L, edit.D, edit.D]),
    delta_bias: new ort.Tensor("float32", edit.bias, [1, edit.L, edit.D]),
    item_bias: new ort.Tensor("float32", edit.itemBias || new Float32Array(N), [1, N]),
  };
  const { scores } = await graph.run(feeds, ["scores"]);
  const order = Array.from(scores.data.keys()).filter((i) => Number.isFinite(scores.data[i]));
  order.sort((a, b) => scores.data[b] - scores.data[a] || a - b);
  return {
    session,
    modelVersion: edit.modelVersion,
    editVersion: edit.editVersion,
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

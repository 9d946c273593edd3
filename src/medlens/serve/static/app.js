// medlens viewer: plain JS + canvas; talks to the REST API of `medlens serve`.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  const VIEW_NAMES = ["Axial", "Coronal", "Sagittal"];
  const S = { models: [], methods: [], image: null, pixels: null, panels: [], point: [0, 0, 0], active: 0, renders: 0 };
  window.medlens = S;

  // ------------------------------------------------------------------ API
  async function api(path, options = {}) {
    options.headers = Object.assign({}, options.headers || {}, token ? { Authorization: "Bearer " + token } : {});
    const response = await fetch(path, options);
    if (!response.ok) {
      let detail = response.status + " " + response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return response;
  }
  async function fetchRaw(path) {
    const response = await api(path);
    const shape = (response.headers.get("X-Shape") || "").split(",").map(Number);
    return { data: new Uint8Array(await response.arrayBuffer()), shape };
  }
  function setStatus(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; s.title = text; }
  async function busy(label, work) {
    document.body.dataset.busy = "1";
    $("explain").disabled = true;
    setStatus(label + "…");
    try { await work(); } catch (e) { setStatus(e.message, true); } finally {
      $("explain").disabled = false;
      document.body.dataset.busy = "0";
    }
  }

  // ------------------------------------------------------------------ colormaps
  const STOPS = {
    jet: [[0, 0, 0, 0.5], [0.11, 0, 0, 1], [0.125, 0, 0, 1], [0.34, 0, 0.88, 1], [0.35, 0, 0.9, 0.97], [0.64, 1, 1, 0], [0.65, 1, 0.96, 0], [0.89, 1, 0, 0], [1, 0.5, 0, 0]],
    viridis: [[0, .267, .005, .329], [.25, .229, .322, .546], [.5, .128, .567, .551], [.75, .369, .789, .383], [1, .993, .906, .144]],
    inferno: [[0, 0, 0, .016], [.25, .341, .062, .429], [.5, .735, .216, .330], [.75, .978, .557, .035], [1, .988, 1, .644]],
    hot: [[0, .04, 0, 0], [.365, 1, 0, 0], [.746, 1, 1, 0], [1, 1, 1, 1]],
    gray: [[0, 0, 0, 0], [1, 1, 1, 1]],
  };
  const LUTS = {};
  function lut(name) {
    if (LUTS[name]) return LUTS[name];
    const stops = STOPS[name] || STOPS.jet, out = new Uint8Array(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = i / 255;
      let j = 0; while (j < stops.length - 2 && t > stops[j + 1][0]) j++;
      const a = stops[j], b = stops[j + 1], f = Math.min(1, Math.max(0, (t - a[0]) / ((b[0] - a[0]) || 1)));
      for (let c = 0; c < 3; c++) out[i * 3 + c] = Math.round(255 * (a[c + 1] + f * (b[c + 1] - a[c + 1])));
    }
    return (LUTS[name] = out);
  }
  function drawColorbar() {
    const canvas = $("colorbar"), ctx = canvas.getContext("2d"), table = lut($("cmap").value);
    const image = ctx.createImageData(canvas.width, canvas.height), thr = +$("threshold").value;
    for (let x = 0; x < canvas.width; x++) {
      const v = Math.round(255 * x / (canvas.width - 1)), dim = v / 255 < thr;
      for (let y = 0; y < canvas.height; y++) {
        const o = (y * canvas.width + x) * 4;
        image.data[o] = dim ? 40 : table[v * 3]; image.data[o + 1] = dim ? 40 : table[v * 3 + 1]; image.data[o + 2] = dim ? 40 : table[v * 3 + 2]; image.data[o + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  // ------------------------------------------------------------------ geometry
  // A plane of a (C, *S) uint8 array: 2D gives the image; 3D axis 0 fixes z (H x W), 1 fixes y (D x W), 2 fixes x (D x H).
  function planeShape(shape, axis) {
    if (shape.length === 2) return [shape[0], shape[1]];
    return axis === 0 ? [shape[1], shape[2]] : axis === 1 ? [shape[0], shape[2]] : [shape[0], shape[1]];
  }
  function voxelIndex(shape, axis, index, r, c) {
    if (shape.length === 2) return r * shape[1] + c;
    const [D, H, W] = shape;
    if (axis === 0) return (index * H + r) * W + c;
    if (axis === 1) return (r * H + index) * W + c;
    return (r * H + c) * W + index;
  }

  // ------------------------------------------------------------------ rendering
  function renderView(canvas, panel, axis) {
    const img = S.image, shape = img.shape, [h, w] = planeShape(shape, axis), index = S.point[axis];
    const off = document.createElement("canvas"); off.width = w; off.height = h;
    const octx = off.getContext("2d"), out = octx.createImageData(w, h), px = S.pixels, C = img.channels, n = px.length / C;
    const map = panel && panel.map, alpha = +$("opacity").value, thr = +$("threshold").value, table = lut($("cmap").value);
    for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) {
      const v = voxelIndex(shape, axis, index, r, c), o = (r * w + c) * 4;
      let R = px[v], G = C === 3 ? px[n + v] : R, B = C === 3 ? px[2 * n + v] : R;
      if (map) {
        const m = map[v];
        if (m / 255 >= thr && m > 0) {
          R = R * (1 - alpha) + table[m * 3] * alpha; G = G * (1 - alpha) + table[m * 3 + 1] * alpha; B = B * (1 - alpha) + table[m * 3 + 2] * alpha;
        }
      }
      out.data[o] = R; out.data[o + 1] = G; out.data[o + 2] = B; out.data[o + 3] = 255;
    }
    octx.putImageData(out, 0, 0);
    const box = shape.length === 3 ? (S.panels.length > 1 ? 178 : 240) : (S.panels.length > 1 ? 440 : 560), scale = Math.min(box / w, box / h);
    canvas.width = Math.round(w * scale); canvas.height = Math.round(h * scale);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = scale < 1;
    ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
    if (panel && $("show-boxes").checked && panel.result.targets[0]) {
      ctx.lineWidth = 2; ctx.strokeStyle = "#39ff88";
      for (const b of panel.result.targets[0].boxes) {
        const rect = boxOnPlane(b.box, shape, axis, index);
        if (rect) ctx.strokeRect(rect[1] * scale, rect[0] * scale, (rect[3] - rect[1]) * scale, (rect[2] - rect[0]) * scale);
      }
    }
    if (panel && panel.result.ground_truth_box) {  // the ground-truth box, dashed
      const rect = boxOnPlane(panel.result.ground_truth_box, shape, axis, index);
      if (rect) {
        ctx.setLineDash([6, 4]); ctx.lineWidth = 2; ctx.strokeStyle = "#ffffff";
        ctx.strokeRect(rect[1] * scale, rect[0] * scale, (rect[3] - rect[1]) * scale, (rect[2] - rect[0]) * scale);
        ctx.setLineDash([]);
      }
    }
    if (shape.length === 3) {  // linked crosshair
      const others = [0, 1, 2].filter((a) => a !== axis), ry = (S.point[others[0]] + 0.5) * scale, cx = (S.point[others[1]] + 0.5) * scale;
      ctx.strokeStyle = "rgba(255,209,102,0.8)"; ctx.lineWidth = 1; ctx.beginPath();
      ctx.moveTo(0, ry); ctx.lineTo(canvas.width, ry); ctx.moveTo(cx, 0); ctx.lineTo(cx, canvas.height); ctx.stroke();
    }
    canvas.dataset.scale = scale;
  }
  function boxOnPlane(box, shape, axis, index) {
    if (shape.length === 2) return box;
    const lo = box.slice(0, 3), hi = box.slice(3);
    if (index < lo[axis] || index >= hi[axis]) return null;
    const keep = [0, 1, 2].filter((a) => a !== axis);
    return [lo[keep[0]], lo[keep[1]], hi[keep[0]], hi[keep[1]]];
  }

  const esc = (text) => String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  function pct(p) { return (100 * p).toFixed(1) + "%"; }
  function panelElement(panel, i) {
    const div = document.createElement("div"); div.className = "panel"; div.dataset.method = panel ? panel.result.method : "";
    const r = panel && panel.result;
    if (r) {
      const layer = esc(r.layers.length ? r.layers.join(", ") + (r.auto_layer ? " (auto)" : "") : "input");
      const t = r.targets[0];
      div.innerHTML = `<h3>${esc(r.method)} <span class="layer">· ${esc(r.model)} · ${layer}</span></h3>
        <p class="prediction">Prediction <b class="pred-name">${esc(r.prediction.name)}</b> · probability <b class="pred-prob">${pct(r.prediction.probability)}</b>${t && t.class !== r.prediction.class ? ` · explaining <b>${esc(t.name)}</b>` : ""}</p>`;
    } else {
      div.innerHTML = `<h3>${esc(S.image.name)} <span class="layer">· not explained yet</span></h3><p class="prediction">Choose a model and method, then Explain.</p>`;
    }
    const row = document.createElement("div"); row.className = "canvases";
    const axes = S.image.dims === 3 ? [0, 1, 2] : [0];
    for (const axis of axes) {
      const view = document.createElement("div"); view.className = "view";
      const canvas = document.createElement("canvas"); canvas.dataset.axis = axis; canvas.dataset.panel = i; canvas.className = "view-canvas";
      view.appendChild(canvas);
      if (S.image.dims === 3) {
        const label = document.createElement("div"); label.className = "slice-label"; label.dataset.axis = axis;
        view.appendChild(label);
      }
      row.appendChild(view);
      attachView(canvas, axis);
    }
    div.appendChild(row);
    if (r) {
      const info = document.createElement("div"); info.className = "info";
      const bars = document.createElement("div"); bars.className = "bars";
      for (const p of r.probabilities.slice(0, 6)) bars.innerHTML += `<div class="bar"><span class="name">${esc(p.name)}</span><div class="track"><div class="fill" style="width:${100 * p.probability}%"></div></div><span class="pct">${pct(p.probability)}</span></div>`;
      info.appendChild(bars); div.appendChild(info);
      if (r.metrics) {
        const table = document.createElement("table"); table.className = "metrics";
        const keep = ["pointing_game", "energy_pointing_game", "relevance_mass", "dice@0.5", "iou@10", "auroc"];
        const keys = keep.filter((k) => k in r.metrics);
        for (const k of keys.length ? keys : Object.keys(r.metrics).slice(0, 6)) {
          const v = r.metrics[k]; table.innerHTML += `<tr><td>${esc(k.replace(/_/g, " "))}</td><td>${v === null ? "n/a" : v.toFixed(3)}</td></tr>`;
        }
        const box = document.createElement("div");
        const caption = document.createElement("div"); caption.className = "muted"; caption.textContent = "Scores against the ground truth";
        box.appendChild(caption); box.appendChild(table); info.appendChild(box);
      }
      const dl = document.createElement("div"); dl.className = "downloads"; dl.append("Download: ");
      for (const [kind, href] of Object.entries(r.downloads)) {
        if (kind === "raw") continue;
        const a = document.createElement("a"); a.href = href; a.textContent = kind.toUpperCase(); a.download = "";
        if (token) a.addEventListener("click", async (e) => { e.preventDefault(); const blob = await (await api(href)).blob(); const u = URL.createObjectURL(blob); const b = document.createElement("a"); b.href = u; b.download = href.split("/").pop(); b.click(); });
        dl.appendChild(a);
      }
      div.appendChild(dl);
    }
    return div;
  }
  function rebuild() {
    const views = $("views"); views.innerHTML = "";
    if (!S.image) return;
    const panels = S.panels.length ? S.panels : [null];
    panels.forEach((p, i) => views.appendChild(panelElement(p, i)));
    redraw();
  }
  function redraw() {
    if (!S.image) return;
    for (const canvas of document.querySelectorAll("canvas.view-canvas")) renderView(canvas, S.panels[+canvas.dataset.panel], +canvas.dataset.axis);
    if (S.image.dims === 3) {
      for (const label of document.querySelectorAll(".slice-label")) {
        const a = +label.dataset.axis; label.textContent = `${VIEW_NAMES[a]} ${S.point[a] + 1} / ${S.image.shape[a]}`;
      }
      $("position").innerHTML = VIEW_NAMES.map((n, a) => `<span id="slice-${a}" class="${a === S.active ? "active" : ""}">${n} ${S.point[a] + 1}/${S.image.shape[a]}</span>`).join(" · ");
    } else {
      $("position").textContent = `${S.image.shape[1]} × ${S.image.shape[0]} pixels`;
    }
    S.renders += 1;
    document.body.dataset.renders = S.renders;
  }
  function attachView(canvas, axis) {
    canvas.addEventListener("wheel", (e) => { e.preventDefault(); S.active = axis; step(e.deltaY > 0 ? 1 : -1); }, { passive: false });
    canvas.addEventListener("mouseenter", () => { S.active = axis; });
    canvas.addEventListener("click", (e) => {
      if (S.image.dims !== 3) return;
      const scale = +canvas.dataset.scale, rect = canvas.getBoundingClientRect();
      const r = Math.floor((e.clientY - rect.top) / scale), c = Math.floor((e.clientX - rect.left) / scale);
      const keep = [0, 1, 2].filter((a) => a !== axis);
      S.point[keep[0]] = clamp(r, S.image.shape[keep[0]]); S.point[keep[1]] = clamp(c, S.image.shape[keep[1]]); S.active = axis;
      redraw();
    });
  }
  function clamp(v, n) { return Math.max(0, Math.min(n - 1, v)); }
  function step(delta) {
    if (!S.image || S.image.dims !== 3) return;
    S.point[S.active] = clamp(S.point[S.active] + delta, S.image.shape[S.active]);
    redraw();
  }
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) && document.activeElement.type !== "range") return;
    if (e.key === "ArrowUp" || e.key === "ArrowRight") { e.preventDefault(); step(1); }
    else if (e.key === "ArrowDown" || e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
  });

  // ------------------------------------------------------------------ actions
  async function openImage(form) {
    const info = await (await api("/api/open", { method: "POST", body: form })).json();
    const raw = await fetchRaw(info.raw);
    S.image = info; S.pixels = raw.data; S.panels = [];
    S.point = info.dims === 3 ? info.shape.map((n) => Math.floor(n / 2)) : [0, 0, 0];
    S.active = 0;
    const fitting = S.models.find((m) => m.dims === info.dims);
    if (fitting && currentModel().dims !== info.dims) { $("model").value = fitting.name; modelChanged(); }
    $("image-info").textContent = `${info.name} · ${info.kind || ""}${info.modality ? " " + info.modality : ""} · ${info.shape.join(" × ")}` + (info.spacing ? ` · ${info.spacing.map((s) => s.toFixed(2)).join(" × ")} mm` : "");
    rebuild();
    setStatus(`Opened ${info.name}. Choose a model and method, then Explain.`);
  }
  function currentModel() { return S.models.find((m) => m.name === $("model").value) || S.models[0]; }
  function modelChanged() {
    const m = currentModel(); if (!m) return;
    fill($("layer"), [["", "automatic" + (m.default_layer ? ` (${m.default_layer})` : "")]].concat(m.layers.map((l) => [l, l])));
    fill($("target"), [["pred", "predicted class"]].concat(m.classes.map((c, i) => [String(i), c])));
  }
  function fill(select, pairs) {
    select.innerHTML = "";
    for (const [value, text] of pairs) { const o = document.createElement("option"); o.value = value; o.textContent = text; select.appendChild(o); }
  }
  async function explainAll() {
    if (!S.image) throw new Error("open an image first");
    const methods = [$("method").value]; if ($("method2").value && $("method2").value !== $("method").value) methods.push($("method2").value);
    const panels = [];
    for (const method of methods) {
      const form = new FormData();
      form.append("image_id", S.image.image_id); form.append("model", $("model").value); form.append("method", method);
      form.append("target", $("target").value);
      if ($("layer").value) form.append("layer", $("layer").value);
      if ($("mask-upload").files.length) form.append("mask", $("mask-upload").files[0]);
      else if ($("mask-file").value) form.append("mask_path", $("mask-file").value);
      if ($("box").value.trim()) form.append("box", $("box").value.trim());
      const result = await (await api("/api/explain", { method: "POST", body: form })).json();
      const raw = await fetchRaw(result.downloads.raw);
      panels.push({ result, map: raw.data });
    }
    S.panels = panels;
    rebuild();
    const r = panels[0].result;
    setStatus(`${methods.join(" vs ")} · prediction ${r.prediction.name} (${pct(r.prediction.probability)})`);
  }

  async function init() {
    try {
      const [models, methods, files] = await Promise.all([api("/api/models"), api("/api/methods"), api("/api/files")].map((p) => p.then((r) => r.json())));
      S.models = models; S.methods = methods;
      fill($("model"), models.map((m) => [m.name, `${m.name} (${m.dims}D)`]));
      const preferred = ["gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "saliency", "inputxgradient", "integrated-gradients", "smoothgrad", "occlusion"];
      const names = methods.map((m) => m.name).sort((a, b) => ((preferred.indexOf(a) + 1) || 99) - ((preferred.indexOf(b) + 1) || 99));
      fill($("method"), names.map((n) => [n, n]));
      fill($("method2"), [["", "none"]].concat(names.map((n) => [n, n])));
      fill($("data-file"), files.files.length ? files.files.map((f) => [f, f]) : [["", files.data ? "(no files)" : "(no --data folder)"]]);
      fill($("mask-file"), [["", "none"]].concat(files.files.map((f) => [f, f])));
      modelChanged();
      drawColorbar();
    } catch (e) { setStatus(e.message, true); }
  }
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0]; if (!file) return;
    const form = new FormData(); form.append("file", file);
    busy("Opening " + file.name, () => openImage(form));
  });
  $("open-data").addEventListener("click", () => {
    if (!$("data-file").value) return;
    const form = new FormData(); form.append("path", $("data-file").value);
    busy("Opening " + $("data-file").value, () => openImage(form));
  });
  $("explain").addEventListener("click", () => busy("Explaining", explainAll));
  $("model").addEventListener("change", modelChanged);
  for (const id of ["opacity", "threshold"]) $(id).addEventListener("input", () => { $(id + "-value").textContent = (+$(id).value).toFixed(2); drawColorbar(); redraw(); });
  $("cmap").addEventListener("change", () => { drawColorbar(); redraw(); });
  $("show-boxes").addEventListener("change", redraw);
  init();
})();

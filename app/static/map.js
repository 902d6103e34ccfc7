// SkyMoE Geo map: runs as the body of gr.HTML's js_on_load.
// In scope: element (this component's root), trigger(event, data), props (props.value is the
// JSON map state written by Python, see app/map_component.py), watch(prop, callback).
// Events sent to Python: 'aoi' {west, south, east, north} (lon/lat degrees) when a rectangle is
// drawn or cleared (all null), 'tile_select' {tile_id, west, south, east, north} on a grid-tile click.

const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
                 "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324"];
const container = element.querySelector(".skymoe-map");
const statusBox = element.querySelector(".skymoe-map-status");

function setStatus(text) { if (statusBox) { statusBox.textContent = text || ""; } }

if (typeof L === "undefined") {
  setStatus("The map library (Leaflet) did not load from /skymoe/leaflet/: check the app's log.");
  element.dataset.leaflet = "missing";
  return;
}

const map = L.map(container, {zoomControl: true, attributionControl: true, minZoom: 1, maxZoom: 22})
  .setView([0, 0], 2);
const blank = L.layerGroup();  // the offline default: no basemap at all
const baseLayers = {
  "No basemap (offline)": blank,
  "OpenStreetMap (online)": L.tileLayer("https://tile.openstreetmap.org/{z}/{x}/{y}.png",
    {maxZoom: 19, attribution: "&copy; OpenStreetMap contributors"}),
  "Esri World Imagery (online)": L.tileLayer(
    "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}",
    {maxZoom: 19, attribution: "Esri World Imagery"}),
};
blank.addTo(map);
for (const [name, layer] of Object.entries(baseLayers)) {
  if (layer.on) {  // online basemaps fail quietly offline: one line under the map, no broken tiles
    layer.on("tileerror", () => setStatus(`${name}: tiles unreachable (offline?); the map works without it.`));
  }
}
const layers = {
  overlay: null,
  grid: L.geoJSON(null, {style: gridStyle, onEachFeature: bindGridTile}),
  results: L.geoJSON(null, {style: resultStyle, onEachFeature: bindResult}),
  aoi: L.layerGroup(),
};
layers.grid.addTo(map);
layers.aoi.addTo(map);
layers.results.addTo(map);
const control = L.control.layers(baseLayers, {
  "Tile grid": layers.grid, "Results": layers.results, "Area of interest": layers.aoi,
}, {collapsed: false}).addTo(map);
L.control.scale({imperial: false}).addTo(map);

const colors = {};
let answers = {};
let selectedTile = null;
const seen = {overlay: null, grid: null, results: null, focus: null, aoi: null};

function colorOf(label) {
  if (!(label in colors)) { colors[label] = PALETTE[Object.keys(colors).length % PALETTE.length]; }
  return colors[label];
}
function esc(text) {
  const span = document.createElement("span");
  span.textContent = text === null || text === undefined ? "" : String(text);
  return span.innerHTML;
}
function gridStyle(feature) {
  const id = feature ? feature.properties.tile_id : null;
  if (id !== null && id === selectedTile) {
    return {color: "#ffffff", weight: 4, fillOpacity: 0.05, dashArray: null};
  }
  const answered = id !== null && answers[id] !== undefined;
  return {color: answered ? "#ffcc00" : "#00e5ff", weight: answered ? 2 : 1,
          fillOpacity: answered ? 0.08 : 0, dashArray: answered ? null : "4 4"};
}
function resultStyle(feature) {
  return {color: colorOf(feature.properties.label), weight: 2, fillOpacity: 0.15};
}
function bindResult(feature, layer) {
  const p = feature.properties;
  const area = p.area_m2 === null || p.area_m2 === undefined ? "n/a" : Number(p.area_m2).toFixed(1) + " m²";
  const score = p.score === null || p.score === undefined ? "n/a" : Number(p.score).toFixed(2);
  layer.bindPopup(`<b>${esc(p.label)}</b><br>score ${score}<br>tile ${esc(p.tile_id)}<br>area ${area}`);
}
function tileBounds(layer) {
  const b = layer.getBounds();
  return {west: b.getWest(), south: b.getSouth(), east: b.getEast(), north: b.getNorth()};
}
function bindGridTile(feature, layer) {
  const id = feature.properties.tile_id;
  const answer = answers[id];
  let html = `<b>tile ${esc(id)}</b>`;
  if (answer) { html += `<br>${esc(answer.text)}<br><i>confidence ${Number(answer.confidence).toFixed(2)}</i>`; }
  html += "<br><small>selected for Chat and Routing</small>";
  layer.bindPopup(html);
  layer.on("click", () => {
    selectedTile = id;
    layers.grid.setStyle(gridStyle);
    trigger("tile_select", Object.assign({tile_id: id}, tileBounds(layer)));
  });
}

function showOverlay(overlay) {
  if (layers.overlay) { control.removeLayer(layers.overlay); map.removeLayer(layers.overlay); layers.overlay = null; }
  if (!overlay) { return; }
  const [w, s, e, n] = overlay.bounds;
  layers.overlay = L.imageOverlay(overlay.url, [[s, w], [n, e]], {opacity: 1.0, interactive: false});
  layers.overlay.addTo(map);
  layers.overlay.bringToBack();
  control.addOverlay(layers.overlay, "Raster: " + esc(overlay.name));
  map.fitBounds([[s, w], [n, e]]);
}
function showGeoJSON(layer, data) {
  layer.clearLayers();
  if (data && data.features && data.features.length) { layer.addData(data); }
}
function showAOI(aoi) {
  layers.aoi.clearLayers();
  if (aoi) {
    const [w, s, e, n] = aoi;
    L.rectangle([[s, w], [n, e]], {color: "#ff7800", weight: 3, fill: false, dashArray: "8 4", interactive: false})
      .addTo(layers.aoi).bringToFront();
  }
}
function focusOn(index) {
  const found = layers.results.getLayers().filter((l) => l.feature.properties._row === index);
  if (found.length) {
    map.fitBounds(found[0].getBounds(), {maxZoom: 19, padding: [40, 40]});
    found[0].openPopup();
  }
}

const legend = L.control({position: "bottomright"});
legend.onAdd = () => L.DomUtil.create("div", "skymoe-legend");
legend.addTo(map);
function updateLegend(counts) {
  const box = legend.getContainer();
  const labels = Object.keys(counts || {});
  if (!labels.length) { box.style.display = "none"; return; }
  box.style.display = "block";
  box.innerHTML = "<b>Detections</b><br>" + labels.map((label) =>
    `<span class="swatch" style="background:${colorOf(label)}"></span>${esc(label)}: ${counts[label]}`).join("<br>");
}

function render() {
  let state;
  try { state = JSON.parse(props.value || "{}"); } catch (err) { setStatus("Bad map state: " + err); return; }
  answers = state.answers || {};
  selectedTile = state.selected === undefined ? null : state.selected;
  const overlayKey = state.overlay ? state.overlay.url : null;
  if (overlayKey !== seen.overlay) { showOverlay(state.overlay); seen.overlay = overlayKey; }
  if (state.grid_key !== seen.grid) { showGeoJSON(layers.grid, state.grid); seen.grid = state.grid_key; }
  else { layers.grid.setStyle(gridStyle); }
  if (state.results_key !== seen.results) {
    showGeoJSON(layers.results, state.results);
    seen.results = state.results_key;
    updateLegend(state.counts);
  }
  const aoiKey = JSON.stringify(state.aoi || null);
  if (aoiKey !== seen.aoi) { showAOI(state.aoi); seen.aoi = aoiKey; }
  if (state.focus && state.focus.nonce !== seen.focus) { focusOn(state.focus.row); seen.focus = state.focus.nonce; }
  setStatus(state.message || "");
  element.dataset.resultFeatures = String(layers.results.getLayers().length);
  element.dataset.overlay = layers.overlay ? "on" : "off";
}

// Rectangle drawing: our own few lines (press the button, then drag on the map).
let drawing = false, start = null, rect = null;
const DrawControl = L.Control.extend({
  onAdd() {
    const bar = L.DomUtil.create("div", "leaflet-bar skymoe-draw");
    const draw = L.DomUtil.create("a", "", bar);
    draw.href = "#"; draw.title = "Draw an area of interest (drag a rectangle)"; draw.textContent = "▭";
    const clear = L.DomUtil.create("a", "", bar);
    clear.href = "#"; clear.title = "Clear the area of interest"; clear.textContent = "✕";
    L.DomEvent.disableClickPropagation(bar);
    L.DomEvent.on(draw, "click", (ev) => { L.DomEvent.preventDefault(ev); startDrawing(); });
    L.DomEvent.on(clear, "click", (ev) => {
      L.DomEvent.preventDefault(ev); showAOI(null); seen.aoi = "null";
      trigger("aoi", {west: null, south: null, east: null, north: null});
    });
    return bar;
  },
});
new DrawControl({position: "topleft"}).addTo(map);
function startDrawing() {
  drawing = true; map.dragging.disable(); container.style.cursor = "crosshair";
  setStatus("Drag a rectangle on the map to set the area of interest.");
}
map.on("mousedown", (ev) => {
  if (!drawing) { return; }
  start = ev.latlng;
  rect = L.rectangle([start, start], {color: "#ff7800", weight: 2, fill: false}).addTo(map);
});
map.on("mousemove", (ev) => { if (drawing && start && rect) { rect.setBounds([start, ev.latlng]); } });
map.on("mouseup", (ev) => {
  if (!drawing || !start) { return; }
  const bounds = L.latLngBounds(start, ev.latlng);
  map.removeLayer(rect); rect = null; start = null; drawing = false;
  map.dragging.enable(); container.style.cursor = "";
  const aoi = [bounds.getWest(), bounds.getSouth(), bounds.getEast(), bounds.getNorth()];
  showAOI(aoi); seen.aoi = JSON.stringify(aoi); setStatus("");
  trigger("aoi", {west: aoi[0], south: aoi[1], east: aoi[2], north: aoi[3]});
});

new ResizeObserver(() => map.invalidateSize()).observe(container);
watch("value", render);
render();
element.dataset.leaflet = "ready";
window.skymoeMap = {map, layers};

// Live training view for the pack's Train nodes: a loss chart on the node (one point per step,
// smoothed line on top), steps, it/s and time left, fed by the server's "blora.train" events.
// The last run's losses are kept in the node's properties, so the chart survives a reload.
// Choosing a recipe sets rank / learning rate / alpha to that recipe's published defaults.
// Which nodes train, and each recipe's defaults, come from the pack's method registry
// (the server's /blora/methods route).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "blora.train";
const PROPERTY = "blora_last_run";
const WIDTH = 320;
const HEIGHT = 150;

function smooth(values, weight = 0.9) {
  const out = [];
  let average = 0;
  let count = 0;
  for (const value of values) {
    if (Number.isFinite(value)) {
      count += 1;
      average = weight * average + (1 - weight) * value;
    }
    out.push(count ? average / (1 - weight ** count) : NaN);
  }
  return out;
}

function formatSeconds(seconds) {
  if (!Number.isFinite(seconds)) return "";
  const minutes = Math.floor(seconds / 60);
  return minutes ? `${minutes}m${Math.round(seconds % 60)}s` : `${Math.round(seconds)}s`;
}

function draw(canvas, run) {
  const context = canvas.getContext("2d");
  context.fillStyle = "#1c1c20";
  context.fillRect(0, 0, WIDTH, HEIGHT);
  const losses = run.losses || [];
  const finite = losses.filter(Number.isFinite);
  context.fillStyle = "#bbb";
  context.font = "11px sans-serif";
  const rate = run.it_per_s ? `${run.it_per_s.toFixed(2)} it/s` : "";
  const left = run.seconds_left ? `${formatSeconds(run.seconds_left)} left` : run.done ? "done" : "";
  context.fillText(`step ${run.step || 0}/${run.total || "?"}  ${rate}  ${left}`, 6, 13);
  if (!finite.length) {
    context.fillText("loss: waiting for the first step", 6, 30);
    return;
  }
  context.fillText(`loss ${finite[finite.length - 1].toFixed(4)}`, 6, 27);
  const low = Math.min(...finite);
  const high = Math.max(...finite);
  const span = high - low || 1;
  const x = (i) => 6 + ((WIDTH - 12) * i) / Math.max(losses.length - 1, 1);
  const y = (v) => HEIGHT - 6 - ((HEIGHT - 40) * (v - low)) / span;
  const line = (values, color, width) => {
    context.strokeStyle = color;
    context.lineWidth = width;
    context.beginPath();
    let started = false;
    values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      if (started) context.lineTo(x(i), y(v));
      else context.moveTo(x(i), y(v));
      started = true;
    });
    context.stroke();
  };
  context.fillStyle = "#777";
  losses.forEach((v, i) => Number.isFinite(v) && context.fillRect(x(i) - 1, y(v) - 1, 2, 2));
  line(losses, "#666", 1);
  line(smooth(losses), "#5ac8ff", 2);
}

function attachChart(node) {
  const canvas = document.createElement("canvas");
  canvas.width = WIDTH;
  canvas.height = HEIGHT;
  canvas.className = "blora-loss-chart";
  node.addDOMWidget("loss_chart", "blora_loss_chart", canvas, {
    serialize: false,
    getMinHeight: () => HEIGHT + 10,
  });
  node.bloraChart = canvas;
  node.properties = node.properties || {};
  draw(canvas, node.properties[PROPERTY] || {});
}

// The editor saves the open workflow (and so node properties) when its change tracker sees a
// change; a property set from an event is not one, so ask it to look.
function persistWorkflow() {
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

let methods = { training_nodes: [], recipes: {}, older_host_nodes: {} };
async function loadMethods() {
  const response = await api.fetchApi("/blora/methods");
  if (response.ok) methods = await response.json();
}

function followRecipe(node) {
  const recipe = node.widgets?.find((w) => w.name === "recipe");
  if (!recipe) return;
  const original = recipe.callback;
  recipe.callback = async function (value, ...rest) {
    const defaults = methods.recipes[value];
    if (defaults) {
      for (const [name, setting] of Object.entries(defaults)) {
        const widget = node.widgets.find((w) => w.name === name);
        if (widget) widget.value = setting;
      }
      node.setDirtyCanvas(true, true);
    }
    return original?.call(this, value, ...rest);
  };
}

// A shipped workflow uses the newest host's node where an older host has another in its place
// (the server's older_host_nodes: type -> [older type, {input name: older input name}]); on a
// host without the newer node, put the older one in before the editor builds the graph.
function forThisHost(graphData) {
  const registered = globalThis.LiteGraph?.registered_node_types || {};
  for (const node of graphData?.nodes || []) {
    const older = methods.older_host_nodes?.[node.type];
    if (!older || registered[node.type] || !registered[older[0]]) continue;
    const [type, names] = older;
    node.type = type;
    if (node.properties) node.properties["Node name for S&R"] = type;
    node.inputs = (node.inputs || []).filter((i) => names[i.name]).map((i) => ({ ...i, name: names[i.name],
      localized_name: names[i.name], label: names[i.name] }));
  }
}

app.registerExtension({
  name: "blora.training",
  async init() {
    await loadMethods();
  },
  beforeConfigureGraph(graphData) {
    forThisHost(graphData);
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node || !node.bloraChart) return;
      let run = node.properties[PROPERTY];
      if (!run || detail.step <= 1 || (run.step || 0) >= detail.step) run = { losses: [] };
      run.losses[detail.step - 1] = detail.loss === null ? NaN : detail.loss;
      Object.assign(run, {
        step: detail.step, total: detail.total, it_per_s: detail.it_per_s,
        seconds_left: detail.seconds_left, done: detail.step >= detail.total,
      });
      node.properties[PROPERTY] = run;
      draw(node.bloraChart, run);
      if (run.done || detail.step % 50 === 0) persistWorkflow();
    });
  },
  nodeCreated(node) {
    if (!methods.training_nodes.includes(node.comfyClass)) return;
    attachChart(node);
    followRecipe(node);
  },
  loadedGraphNode(node) {
    if (node.bloraChart) draw(node.bloraChart, node.properties?.[PROPERTY] || {});
  },
});

// The labelling page: one pair at a time; a choice is shown as made only once the server has
// written it to the labeller's file, so closing the page never loses a confirmed choice.
"use strict";

const $ = (id) => document.getElementById(id);
let name = null;
let current = null;     // the pair on screen
let busy = false;       // a request is in flight: further keys wait
const stamps = [];      // times (ms) of this session's confirmed choices, for the ETA

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function eta(remaining) {
  if (stamps.length < 2 || remaining === 0) return "";
  const perPair = (stamps[stamps.length - 1] - stamps[0]) / (stamps.length - 1) / 1000;
  const seconds = Math.round(perPair * remaining);
  return "ETA " + (seconds < 90 ? seconds + " s" : Math.round(seconds / 60) + " min");
}

function render(state) {
  current = state.pair;
  $("labeller").textContent = "labeller: " + state.name;
  $("progress").textContent = state.done + " / " + state.total + " labelled";
  $("eta").textContent = eta(state.total - state.done);
  $("agreement").textContent = state.agreement.join("; ");
  $("who").style.display = "none";
  if (current === null) {
    $("work").hidden = true;
    $("done").style.display = "block";
    return;
  }
  $("done").style.display = "none";
  $("work").hidden = false;
  $("prompt").textContent = current.prompt;
  $("image0").src = current.image_0;
  $("image1").src = current.image_1;
  document.body.dataset.pairId = current.pair_id;
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method, headers: {"Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response.json();
}

async function send(path, body, message) {
  if (busy) return;
  busy = true;
  try {
    const state = await call("POST", path, body);
    if (path === "/api/choice") stamps.push(Date.now());
    render(state);
    setStatus(message, false);
  } catch (err) {
    setStatus("not saved: " + err.message + " (the pair stays; try again)", true);
  } finally {
    busy = false;
  }
}

function choose(choice) {
  if (current === null) return;
  const words = {0: "image 1", 1: "image 2", tie: "tie", skip: "skipped"};
  send("/api/choice", {name, pair_id: current.pair_id, choice}, "saved: " + current.pair_id + " -> " + words[choice]);
}

function undo() {
  stamps.pop();
  send("/api/undo", {name}, "undone");
}

async function start(who) {
  name = who;
  localStorage.setItem("diffalign-labeller", name);
  try {
    render(await call("GET", "/api/state?name=" + encodeURIComponent(name)));
  } catch (err) {
    setStatus(err.message, true);
  }
}

document.addEventListener("keydown", (event) => {
  if (name === null || event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "1") choose(0);
  else if (key === "2") choose(1);
  else if (key === "t") choose("tie");
  else if (key === "s") choose("skip");
  else if (key === "u") undo();
  else return;
  event.preventDefault();
});

for (const id of ["left", "right", "tie", "skip"]) {
  $(id).addEventListener("click", () => {
    const value = $(id).dataset.choice;
    choose(value === "0" ? 0 : value === "1" ? 1 : value);
  });
}
$("undo").addEventListener("click", undo);
$("undo-done").addEventListener("click", undo);
$("who").addEventListener("submit", (event) => {
  event.preventDefault();
  start($("name").value.trim());
});

const fromUrl = new URLSearchParams(location.search).get("name");
const known = fromUrl || window.DEFAULT_NAME || localStorage.getItem("diffalign-labeller");
if (known) start(known); else $("who").style.display = "block";

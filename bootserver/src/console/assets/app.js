// Aula console: a small single-page app over the boot server's JSON API.
// No framework, nothing loaded from outside. One event stream per page.
"use strict";

const S = { user: null, csrf: "", rooms: null, es: null };

// ---- helpers ---------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}
const $ = (id) => document.getElementById(id);
function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + u[i];
}
function rate(bps) { return bps ? bytes(bps) + "/s" : ""; }
function when(s) {
  if (!s) return "";
  const d = new Date(s), now = Date.now(), ago = (now - d) / 1000;
  if (ago < 60) return "just now";
  if (ago < 3600) return Math.round(ago / 60) + " min ago";
  if (ago < 86400) return Math.round(ago / 3600) + " h ago";
  return d.toLocaleDateString() + " " + d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}
const LABEL = {
  unseen: "not seen", live: "live system", offline: "agent not answering", booting: "booting", os: "installed OS", pending: "pending",
  waking: "waking", "booting-live": "booting live", "agent-ready": "agent ready", partitioning: "partitioning",
  restoring: "restoring", capturing: "capturing", "setting-local-boot": "setting local boot",
  rebooting: "rebooting", "powering-off": "powering off", done: "done", failed: "failed", cancelled: "cancelled",
};
function chip(state) { return h("span", { class: "chip s-" + state }, LABEL[state] || state); }
function toast(msg) {
  const t = $("toast");
  t.textContent = msg;
  t.classList.add("show");
  clearTimeout(toast.t);
  toast.t = setTimeout(() => t.classList.remove("show"), 4000);
}
async function api(method, path, body, raw) {
  const opt = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") opt.headers["X-CSRF-Token"] = S.csrf;
  if (body !== undefined) {
    if (raw) { opt.body = body; opt.headers["Content-Type"] = raw; }
    else { opt.body = JSON.stringify(body); opt.headers["Content-Type"] = "application/json"; }
  }
  const r = await fetch(path, opt);
  let j = null;
  try { j = await r.json(); } catch (_) { j = null; }
  if (r.status === 401 && path !== "/v1/session") { signin(); throw new Error("signed out"); }
  if (!r.ok) throw new Error((j && j.error) || ("HTTP " + r.status));
  return j;
}
function stream(path, name, fn) {
  if (S.es) S.es.close();
  S.es = new EventSource(path);
  S.es.addEventListener(name, (e) => { try { fn(JSON.parse(e.data)); } catch (err) { console.error(err); } });
  return S.es;
}
function page(title, ...kids) {
  const m = $("main");
  m.replaceChildren(h("h1", {}, title), ...kids);
  return m;
}
function q() {
  const i = location.hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : location.hash.slice(i + 1));
}

// ---- sign-in ---------------------------------------------------------------
function signin() {
  if (S.es) { S.es.close(); S.es = null; }
  $("nav").hidden = true;
  $("who").replaceChildren();
  const err = h("div", { class: "err", id: "signin-error" });
  const user = h("input", { id: "user", autocomplete: "username", placeholder: "user name", required: true });
  const pw = h("input", { id: "password", type: "password", autocomplete: "current-password", placeholder: "password", required: true });
  const form = h("form", { class: "card signin", id: "signin",
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = "";
      try {
        const s = await api("POST", "/v1/session", { user: user.value, password: pw.value });
        Object.assign(S, { user: s.user, csrf: s.csrf, rooms: s.rooms });
        started();
      } catch (ex) { err.textContent = ex.message; }
    } },
    h("h2", {}, "Sign in to the Aula console"), h("label", { for: "user" }, "User"), user,
    h("label", { for: "password" }, "Password"), pw, err, h("button", { class: "primary", type: "submit" }, "Sign in"));
  $("main").replaceChildren(form);
  user.focus();
}
function started() {
  $("nav").hidden = false;
  $("who").replaceChildren(
    h("span", { id: "whoami", title: S.user + (S.rooms ? " · rooms: " + S.rooms.join(", ") : " · every room") },
      S.user + (S.rooms ? " · " + S.rooms.join(", ") : "")),
    h("button", { class: "small", onclick: async () => { try { await api("DELETE", "/v1/session"); } catch (_) {} signin(); } }, "Sign out"));
  if (!location.hash || location.hash === "#/") location.hash = "#/rooms";
  else route();
}

// ---- pages -----------------------------------------------------------------
function tile(m, big) {
  const el = h("a", { class: "tile s-" + m.state, href: "#/machines?q=" + encodeURIComponent(m.mac), "data-id": m.id,
      title: m.name + " · " + m.mac + (m.ip ? " · " + m.ip : "") + (m.image ? " · " + m.image : "") },
    h("b", {}, m.name), h("span", { class: "st" }, LABEL[m.state] || m.state),
    h("i", { class: "bar", style: m.percent != null ? "width:" + m.percent + "%" : "width:0" }));
  if (big && m.ip) el.append(h("div", { class: "st mono" }, m.ip));
  return el;
}
function updateTiles(doc) {
  for (const [id, state, pct] of doc.machines) {
    const t = document.querySelector('.tile[data-id="' + id + '"]');
    if (!t) continue;
    t.className = "tile s-" + state;
    t.querySelector(".st").textContent = (LABEL[state] || state) + (pct != null ? " " + pct + "%" : "");
    t.querySelector(".bar").style.width = (pct != null ? pct : 0) + "%";
  }
  for (const r of doc.rooms) {
    const c = document.querySelector('.counts[data-room="' + r.id + '"]');
    if (c) c.replaceChildren(...Object.entries(r.counts || {}).map(([s, n]) => h("span", { class: "chip s-" + s }, n + " " + (LABEL[s] || s))));
  }
}
async function pageRooms() {
  const [rooms, ms] = await Promise.all([api("GET", "/v1/rooms"), api("GET", "/v1/machines?limit=1000")]);
  const byRoom = {};
  for (const m of ms.machines) (byRoom[m.room_id] = byRoom[m.room_id] || []).push(m);
  const cards = rooms.map((r) => h("section", { class: "card", "data-room": r.id },
    h("div", { class: "room-head" },
      h("div", { class: "room-title" },
        h("h2", { title: r.name }, h("a", { href: "#/rooms/" + r.id }, r.name)),
        h("div", { class: "muted room-desc", title: r.description || "" },
          r.machines + " machines" + (r.description ? " · " + r.description : ""))),
      h("a", { class: "btn", href: "#/deploy?room=" + r.id }, "Deploy…")),
    h("div", { class: "counts", "data-room": r.id }),
    h("div", { class: "tiles" }, (byRoom[r.id] || []).map((m) => tile(m)))));
  const newRoom = h("input", { placeholder: "new room name", id: "new-room" });
  const file = h("input", { type: "file", accept: ".csv,.toml,text/csv", id: "import-file" });
  const tools = h("div", { class: "card row" },
    newRoom, h("button", { onclick: async () => {
      try { await api("POST", "/v1/rooms", { name: newRoom.value }); toast("Room created"); route(); } catch (e) { toast(e.message); }
    } }, "Add room"),
    h("span", { class: "spacer" }), h("label", {}, "Import machines (CSV or TOML)"), file,
    h("button", { onclick: async () => {
      const f = file.files[0];
      if (!f) return toast("Choose a file first");
      try {
        const text = await f.text();
        const r = await api("POST", "/v1/machines/import", text, f.name.endsWith(".toml") ? "application/toml" : "text/csv");
        toast(`Imported: ${r.machines_created} new, ${r.machines_updated} updated, ${r.rooms_created} rooms`);
        route();
      } catch (e) { toast(e.message); }
    } }, "Import"));
  // Operators limited to rooms cannot add rooms or machines.
  const all = !S.rooms;
  page("Rooms", rooms.length ? h("div", { class: "grid-rooms" }, cards) :
    h("p", { class: "card muted" }, "No rooms yet: add one, import a CSV/TOML file, or adopt machines DHCP has seen."),
    all ? tools : "", all ? await adoptCard(rooms) : "");
  stream("/v1/console/events", "tiles", updateTiles);
}
async function adoptCard(rooms) {
  let list = [];
  try { list = await api("GET", "/v1/machines/unadopted"); } catch (_) { return ""; }
  if (!list.length) return "";
  const sel = h("select", {}, rooms.map((r) => h("option", { value: r.id }, r.name)));
  const prefix = h("input", { placeholder: "name prefix (optional)" });
  const boxes = list.map((c) => h("input", { type: "checkbox", value: c.mac, checked: true }));
  return h("section", { class: "card" }, h("h2", {}, `Seen by DHCP, not in a room (${list.length})`),
    h("table", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "MAC"), h("th", {}, "address"), h("th", {}, "host name"), h("th", {}, "last seen"), h("th", {}, "agent")),
      list.map((c, i) => h("tr", {}, h("td", {}, boxes[i]), h("td", { class: "mono" }, c.mac), h("td", { class: "mono" }, c.ip || ""),
        h("td", {}, c.hostname || ""), h("td", {}, when(c.last_seen)), h("td", {}, c.agent ? "up" : "")))),
    h("div", { class: "row", style: "margin-top:10px" }, h("span", {}, "Adopt into"), sel, prefix,
      h("button", { class: "primary", onclick: async () => {
        const macs = boxes.filter((b) => b.checked).map((b) => b.value);
        try {
          await api("POST", "/v1/machines/adopt", { macs, room_id: Number(sel.value), name_prefix: prefix.value || null });
          toast(macs.length + " machine(s) adopted"); route();
        } catch (e) { toast(e.message); }
      } }, "Adopt selected")));
}
async function pageRoom(id) {
  const r = await api("GET", "/v1/rooms/" + id);
  page(r.room.name,
    h("div", { class: "card" }, h("div", { class: "row" }, h("span", { class: "muted" }, r.room.machines + " machines" + (r.room.description ? " · " + r.room.description : "")),
      h("span", { class: "spacer" }), legend(), h("a", { class: "btn", href: "#/deploy?room=" + id }, "Deploy to this room…")),
      h("div", { class: "counts", "data-room": id }),
      h("div", { class: "tiles big" }, r.machines.map((m) => tile(m, true)))));
  stream("/v1/console/events?room=" + id, "tiles", updateTiles);
}
function legend() {
  return h("div", { class: "legend" }, ["unseen", "live", "offline", "restoring", "os", "failed"].map(chip));
}
async function pageMachines() {
  const p = q();
  const offset = Number(p.get("offset") || 0), limit = 50;
  const search = p.get("q") || "";
  const rooms = await api("GET", "/v1/rooms");
  const roomSel = h("select", { id: "room-filter" }, h("option", { value: "" }, "all rooms"), rooms.map((r) => h("option", { value: r.id, selected: p.get("room") == r.id }, r.name)));
  const path = "/v1/machines?limit=" + limit + "&offset=" + offset + (search ? "&q=" + encodeURIComponent(search) : "") + (p.get("room") ? "&room=" + p.get("room") : "");
  const ms = await api("GET", path);
  const boxes = ms.machines.map((m) => h("input", { type: "checkbox", value: m.id, "data-mac": m.mac }));
  const all = h("input", { type: "checkbox", onchange: (e) => boxes.forEach((b) => (b.checked = e.target.checked)) });
  const picked = () => boxes.filter((b) => b.checked);
  const input = h("input", { placeholder: "search name, MAC, IP", value: search, id: "search" });
  const go = (o) => { location.hash = "#/machines?offset=" + o + (input.value ? "&q=" + encodeURIComponent(input.value) : "") + (roomSel.value ? "&room=" + roomSel.value : ""); };
  const boot = async (mode, once) => {
    const ids = picked().map((b) => Number(b.value));
    if (!ids.length) return toast("Select machines first");
    try {
      const r = await api("POST", "/v1/machines/boot", { ids, mode, once });
      toast("Boot mode set on " + r.set + " machine(s)" + (r.failed.length ? "; " + r.failed.length + " failed: " + r.failed[0].error : ""));
    } catch (e) { toast(e.message); }
    route();
  };
  page("Machines",
    h("div", { class: "card row" }, input, roomSel, h("button", { onclick: () => go(0) }, "Filter"), h("span", { class: "spacer" }),
      h("button", { onclick: () => { const macs = picked().map((b) => b.dataset.mac); if (!macs.length) return toast("Select machines first"); location.hash = "#/deploy?machines=" + macs.join(","); } }, "Deploy to selected…"),
      h("button", { onclick: () => boot("local", false) }, "Boot local"),
      h("button", { onclick: () => boot("live", true) }, "Boot live once")),
    h("table", { id: "machines" }, h("tr", {}, h("th", {}, all), h("th", {}, "Name"), h("th", {}, "MAC"), h("th", {}, "Room"), h("th", {}, "Address"),
      h("th", {}, "State"), h("th", {}, "Image"), h("th", {}, "Last seen")),
      ms.machines.map((m, i) => h("tr", {}, h("td", {}, boxes[i]), h("td", {}, m.name), h("td", { class: "mono" }, m.mac),
        h("td", {}, m.room || h("span", { class: "muted" }, "none")), h("td", { class: "mono" }, m.ip || m.expected_ip || ""),
        h("td", {}, chip(m.state), m.percent != null ? " " + m.percent + "%" : ""),
        h("td", {}, m.image ? m.image + (m.image_version ? " v" + m.image_version : "") : ""), h("td", {}, when(m.last_seen))))),
    h("div", { class: "pager" }, h("span", { class: "muted" }, `${ms.total ? offset + 1 : 0}–${offset + ms.machines.length} of ${ms.total}`),
      h("button", { disabled: offset === 0, onclick: () => go(Math.max(0, offset - limit)) }, "Previous"),
      h("button", { disabled: offset + limit >= ms.total, onclick: () => go(offset + limit) }, "Next")));
}
async function pageDeploy() {
  const p = q();
  const [rooms, images] = await Promise.all([api("GET", "/v1/rooms"), api("GET", "/v1/console/images")]);
  const macs = (p.get("machines") || "").split(",").filter(Boolean);
  const f = {
    room: h("select", { id: "d-room" }, macs.length ? h("option", { value: "" }, macs.length + " selected machine(s)") : null,
      rooms.map((r) => h("option", { value: r.id, selected: p.get("room") == r.id }, r.name + " (" + r.machines + ")"))),
    image: h("select", { id: "d-image" }, images.map((i) => h("option", { value: i.name }, i.name))),
    version: h("select", { id: "d-version" }),
    disk: h("input", { id: "d-disk", type: "number", min: 1, value: 1 }),
    partition: h("input", { id: "d-partition", type: "number", min: 0, value: 1 }),
    method: h("select", { id: "d-method" }, ["unicast", "unicast-cache", "swarm"].map((m) => h("option", {}, m))),
    after: h("select", { id: "d-after" }, h("option", { value: "reboot-local" }, "reboot into the restored system"),
      h("option", { value: "poweroff" }, "power off"), h("option", { value: "stay" }, "stay in the live system")),
    layoutMode: h("select", { id: "d-layout-mode" }, h("option", { value: "" }, "keep the partitions"),
      h("option", { value: "machine" }, "each machine's stored layout"), h("option", { value: "custom" }, "this layout (JSON)")),
    layout: h("textarea", { id: "d-layout", hidden: true, placeholder: '{"table": "gpt", "partitions": [...]}' }),
    start: h("input", { id: "d-start", type: "datetime-local" }),
    max: h("input", { id: "d-max", type: "number", min: 0, value: 0 }),
  };
  const setVersions = () => {
    const im = images.find((i) => i.name === f.image.value);
    f.version.replaceChildren(h("option", { value: "" }, "latest" + (im ? " (v" + im.version + ")" : "")),
      ...(im ? im.versions.slice().reverse().map((v) => h("option", { value: v }, "v" + v)) : []));
    if (im && im.kind === "disk") f.partition.value = 0;
  };
  f.image.addEventListener("change", setVersions);
  setVersions();
  f.layoutMode.addEventListener("change", () => (f.layout.hidden = f.layoutMode.value !== "custom"));
  const box = h("div", { id: "confirm-box" });
  const req = () => {
    const b = { image: f.image.value + (f.version.value ? "@" + f.version.value : ""), disk: Number(f.disk.value),
      partition: Number(f.partition.value) || null, method: f.method.value, after: f.after.value,
      max_concurrent: Number(f.max.value) || null };
    if (f.room.value) b.room = Number(f.room.value); else b.machines = macs;
    if (f.layoutMode.value === "machine") b.layout = "machine";
    if (f.layoutMode.value === "custom") b.layout = JSON.parse(f.layout.value);
    if (f.start.value) b.start_at = new Date(f.start.value).toISOString();
    return b;
  };
  const field = (l, e) => h("div", {}, h("label", { for: e.id }, l), e);
  const cap = { machine: h("input", { id: "c-machine", placeholder: "name or MAC" }), image: h("input", { id: "c-image", placeholder: "new image name" }),
    disk: h("input", { id: "c-disk", type: "number", min: 1, value: 1 }), partition: h("input", { id: "c-partition", type: "number", min: 0, value: 1 }) };
  page("Deploy an image",
    h("form", { class: "card", id: "deploy-form", onsubmit: async (e) => {
      e.preventDefault();
      let b;
      try { b = req(); } catch (ex) { return toast("Layout: " + ex.message); }
      try {
        const pv = await api("POST", "/v1/deployments/preview", b);
        box.replaceChildren(h("div", { class: "card confirm" },
          h("h2", {}, `Overwrite ${pv.overwrites} on ${pv.machines.length} machine(s)?`),
          h("p", {}, "Everything there is replaced by ", h("b", {}, pv.image + (pv.version ? " v" + pv.version : " (latest)")), ". These machines:"),
          h("ul", {}, pv.machines.map((m) => h("li", {}, m.name + " ", h("span", { class: "muted mono" }, m.mac), m.image ? h("span", { class: "muted" }, " · now " + m.image) : ""))),
          h("div", { class: "row" }, h("button", { class: "danger", id: "confirm-deploy", type: "button", onclick: async () => {
            try { const d = await api("POST", "/v1/deployments", b); location.hash = "#/deployments/" + d.id; } catch (ex) { toast(ex.message); }
          } }, `Overwrite ${pv.machines.length} machine(s)`), h("button", { type: "button", onclick: () => box.replaceChildren() }, "Cancel"))));
        box.scrollIntoView({ behavior: "smooth" });
      } catch (ex) { toast(ex.message); }
    } },
      h("div", { class: "form" }, field("Target", f.room), field("Image", f.image), field("Version", f.version), field("Disk", f.disk),
        field("Partition (0 = whole disk)", f.partition), field("Method", f.method), field("Afterwards", f.after),
        field("Partitions", f.layoutMode), field("Start at (empty = now)", f.start), field("Restores at once (0 = all)", f.max),
        h("div", { class: "wide" }, f.layout)),
      h("div", { class: "row", style: "margin-top:14px" }, h("button", { class: "primary", type: "submit", id: "review" }, "Review…"))),
    box,
    h("form", { class: "card", id: "capture-form", onsubmit: async (e) => {
      e.preventDefault();
      if (!confirm(`Capture partition ${cap.partition.value} of disk ${cap.disk.value} of ${cap.machine.value} as a new version of ${cap.image.value}?`)) return;
      try {
        const d = await api("POST", "/v1/captures", { machine: cap.machine.value, image: cap.image.value, disk: Number(cap.disk.value), partition: Number(cap.partition.value) || null });
        location.hash = "#/deployments/" + d.id;
      } catch (ex) { toast(ex.message); }
    } }, h("h2", {}, "Capture an image from a machine"),
      h("div", { class: "form" }, field("Machine", cap.machine), field("Image name", cap.image), field("Disk", cap.disk), field("Partition (0 = whole disk)", cap.partition)),
      h("div", { class: "row", style: "margin-top:14px" }, h("button", { type: "submit" }, "Capture…"))));
}
async function pageDeployments() {
  const list = await api("GET", "/v1/deployments?limit=100");
  page("Deployments", h("table", { id: "deployments" }, h("tr", {}, ["#", "What", "Target", "State", "Done", "Failed", "By", "Created"].map((t) => h("th", {}, t))),
    list.map((d) => h("tr", {}, h("td", {}, h("a", { href: "#/deployments/" + d.id }, d.id)),
      h("td", {}, (d.kind === "capture" ? "capture " : "") + d.image + (d.version ? " v" + d.version : "")),
      h("td", {}, d.room || d.total + " machine(s)"), h("td", {}, chip(d.state === "finished" ? (d.failed ? "failed" : "done") : d.state === "running" ? "restoring" : d.state), " ", d.state),
      h("td", {}, d.done + "/" + d.total), h("td", {}, d.failed || ""), h("td", {}, d.created_by), h("td", {}, when(d.created_at))))));
}
async function pageDeployment(id) {
  const d = await api("GET", "/v1/deployments/" + id);
  const totalBar = h("i", { style: "width:0" });
  const stats = h("div", { class: "row", id: "dep-stats" });
  const tbody = h("tbody", {});
  const rows = {};
  const header = h("div", { class: "card" },
    h("div", { class: "row" }, h("div", {}, h("b", {}, (d.kind === "capture" ? "Capture of " : "") + d.image + (d.version ? " v" + d.version : "")),
      h("div", { class: "muted" }, (d.room ? d.room + " · " : "") + (d.partition ? "partition " + d.partition + " of " : "whole ") + "disk " + d.disk + " · " + d.method + " · then " + d.after + " · by " + d.created_by)),
      h("span", { class: "spacer" }), stats,
      h("button", { id: "retry", hidden: true, onclick: async () => {
        try { const n = await api("POST", "/v1/deployments/" + id + "/retry"); location.hash = "#/deployments/" + n.id; } catch (e) { toast(e.message); }
      } }, "Retry the failed ones"),
      h("button", { id: "cancel-all", class: "danger", onclick: async () => {
        if (!confirm("Cancel this deployment for every machine still in it?")) return;
        try { await api("POST", "/v1/deployments/" + id + "/cancel"); toast("Cancelling"); } catch (e) { toast(e.message); }
      } }, "Cancel deployment")),
    h("div", { class: "progress big-progress", style: "margin-top:12px" }, totalBar));
  page("Deployment " + id, header,
    h("table", { id: "dep-machines" }, h("thead", {}, h("tr", {}, ["Machine", "State", "Progress", "", "Since", ""].map((t) => h("th", {}, t)))), tbody));
  const render = (doc) => {
    let done = 0, failed = 0;
    for (const [mac, name, st, bd, bt, r, reason, since] of doc.machines) {
      if (st === "done") done++;
      if (st === "failed") failed++;
      let row = rows[mac];
      if (!row) {
        row = rows[mac] = { tr: h("tr", { "data-mac": mac }), state: h("td", {}), bar: h("i", {}), prog: h("div", { class: "progress" }), txt: h("td", { class: "muted" }), since: h("td", { class: "muted" }), act: h("td", {}) };
        row.prog.append(row.bar);
        row.tr.append(h("td", {}, h("b", {}, name), h("div", { class: "muted mono" }, mac)), row.state, h("td", {}, row.prog), row.txt, row.since, row.act);
        tbody.append(row.tr);
      }
      const pct = bt ? Math.min(100, (100 * bd) / bt) : st === "done" ? 100 : 0;
      row.state.replaceChildren(chip(st), reason ? h("div", { class: "reason" }, reason) : "");
      row.prog.className = "progress" + (st === "done" ? " done" : st === "failed" ? " failed" : "");
      row.bar.style.width = pct.toFixed(1) + "%";
      row.prog.dataset.state = st;
      row.txt.textContent = bt ? `${bytes(bd)} of ${bytes(bt)} ${rate(r)}` : "";
      row.since.textContent = when(new Date(since).toISOString());
      const final = ["done", "failed", "cancelled"].includes(st);
      row.act.replaceChildren(final || doc.state !== "running" ? "" : h("button", { class: "small", onclick: async () => {
        try { await api("POST", `/v1/deployments/${id}/machines/${mac}/cancel`); } catch (e) { toast(e.message); }
      } }, "Cancel"));
    }
    const pct = doc.bytes_total ? (100 * doc.bytes_done) / doc.bytes_total : 0;
    totalBar.style.width = (doc.state === "finished" && !failed ? 100 : pct).toFixed(1) + "%";
    stats.replaceChildren(
      h("div", { class: "stat" }, h("b", {}, done + "/" + doc.total), h("span", {}, "done")),
      h("div", { class: "stat" }, h("b", { style: failed ? "color:var(--red)" : "" }, failed), h("span", {}, "failed")),
      h("div", { class: "stat" }, h("b", {}, rate(doc.rate_bps) || "–"), h("span", {}, "now")),
      h("div", { class: "stat" }, h("b", { id: "dep-state" }, doc.state), h("span", {}, "state")));
    $("retry").hidden = !(failed && doc.state !== "running" && doc.state !== "scheduled");
    $("cancel-all").hidden = !(doc.state === "running" || doc.state === "scheduled");
  };
  if (d.live) render(d.live);
  stream("/v1/deployments/" + id + "/events", "deployment", render);
}
async function pageImages() {
  const list = await api("GET", "/v1/console/images");
  page("Images", h("table", { id: "images" }, h("tr", {}, ["Image", "Latest", "Versions", "Kind", "Filesystem", "Used", "Stored", "Created", "State", "Running on"].map((t) => h("th", {}, t))),
    list.map((i) => h("tr", {}, h("td", {}, h("b", {}, i.name)), h("td", {}, "v" + i.version), h("td", {}, i.versions.map((v) => "v" + v).join(" ")),
      h("td", {}, i.kind), h("td", {}, i.filesystem || ""), h("td", {}, bytes(i.used_bytes)), h("td", {}, bytes(i.stored_bytes)),
      h("td", {}, when(i.created)), h("td", {}, i.state),
      h("td", {}, i.machines ? i.machines + ": " + i.machine_names.slice(0, 8).join(", ") + (i.machines > 8 ? "…" : "") : h("span", { class: "muted" }, "none"))))));
}
async function pageBoot() {
  const b = await api("GET", "/v1/console/boot");
  const set = (id, mode, once) => async () => {
    try { await api("PUT", "/v1/machines/" + id + "/boot", { mode, once }); toast("Boot mode set"); route(); } catch (e) { toast(e.message); }
  };
  page("Boot modes", h("p", { class: "muted" }, "Machines without a setting boot the server default: ", h("b", {}, b.default_mode), "."),
    h("table", { id: "boot" }, h("tr", {}, ["Machine", "Room", "Next boot", "Setting", "Last boot", ""].map((t) => h("th", {}, t))),
      b.machines.map((m) => h("tr", {}, h("td", {}, m.name, h("div", { class: "muted mono" }, m.mac)), h("td", {}, m.room || ""),
        h("td", {}, chip(m.next === "live" ? "live" : "os"), " ", m.next),
        h("td", {}, (m.boot.mode || "default") + (m.boot.once ? ", once: " + m.boot.once : "")),
        h("td", {}, m.last_boot ? m.last_boot.mode + " " + when(m.last_boot.at) : ""),
        h("td", {}, h("button", { class: "small", onclick: set(m.id, "local", false) }, "Local"), " ",
          h("button", { class: "small", onclick: set(m.id, "live", true) }, "Live once"), " ",
          h("button", { class: "small", onclick: set(m.id, null, false) }, "Default"))))));
}
async function pageLog() {
  const before = q().get("before");
  const list = await api("GET", "/v1/log?limit=100" + (before ? "&before=" + before : ""));
  page("Command log", h("table", { id: "log" }, h("tr", {}, ["When", "Who", "Command", "On", "Outcome"].map((t) => h("th", {}, t))),
    list.map((e) => h("tr", {}, h("td", { title: e.at }, when(e.at)), h("td", {}, e.who), h("td", {}, e.action), h("td", {}, e.target),
      h("td", { class: e.outcome === "ok" || e.outcome.startsWith("finished") ? "" : "reason" }, e.outcome)))),
    list.length === 100 ? h("div", { class: "pager" }, h("a", { class: "btn", href: "#/log?before=" + list[list.length - 1].id }, "Older")) : "");
}

async function pageSessions() {
  const list = await api("GET", "/v1/sessions");
  const end = (sess) => async () => {
    if (!confirm(sess.current ? "End your own session? You will have to sign in again." : "End " + sess.user + "'s session?")) return;
    try { await api("DELETE", "/v1/sessions/" + sess.id); toast("Session ended"); if (sess.current) return signin(); route(); } catch (e) { toast(e.message); }
  };
  page("Sessions", h("p", { class: "muted" }, "Operators signed in now. Ending a session signs it out at once."),
    h("table", { id: "sessions" }, h("tr", {}, ["User", "Signed in", "Expires", ""].map((t) => h("th", {}, t))),
      list.map((x) => h("tr", { "data-session": x.id }, h("td", {}, x.user, x.current ? h("span", { class: "muted" }, " (this browser)") : ""),
        h("td", { title: x.created_at }, when(x.created_at)), h("td", { title: x.expires_at }, x.expires_at.replace("T", " ").slice(0, 16)),
        h("td", {}, h("button", { class: "small", onclick: end(x) }, "End session"))))));
}

// ---- router ----------------------------------------------------------------
async function route() {
  if (!S.user) return;
  if (S.es) { S.es.close(); S.es = null; }
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/rooms";
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("on", a.dataset.nav === parts[0]));
  try {
    if (parts[0] === "rooms" && parts[1]) await pageRoom(parts[1]);
    else if (parts[0] === "machines") await pageMachines();
    else if (parts[0] === "deploy") await pageDeploy();
    else if (parts[0] === "deployments" && parts[1]) await pageDeployment(parts[1]);
    else if (parts[0] === "deployments") await pageDeployments();
    else if (parts[0] === "images") await pageImages();
    else if (parts[0] === "boot") await pageBoot();
    else if (parts[0] === "log") await pageLog();
    else if (parts[0] === "sessions") await pageSessions();
    else await pageRooms();
  } catch (e) {
    if (e.message !== "signed out") page("Something went wrong", h("p", { class: "reason" }, e.message));
  }
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  try {
    const s = await api("GET", "/v1/session");
    Object.assign(S, { user: s.user, csrf: s.csrf, rooms: s.rooms });
    started();
  } catch (_) { signin(); }
});

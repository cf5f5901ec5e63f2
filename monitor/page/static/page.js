// Live updates for the status page: one EventSource on /v1/events, applied in place.
// The server-rendered HTML is complete without this file.
"use strict";
(() => {
  const topics = document.body.dataset.topics;
  const live = document.getElementById("live");
  if (!topics || !window.EventSource) return;
  const severity = ["critical", "warning", "unknown", "maintenance", "passing"];
  const source = new EventSource("/v1/events?topics=" + encodeURIComponent(topics));
  source.onopen = () => { live.textContent = "Live: updates as they happen."; };
  source.onerror = () => { live.textContent = "Live updates paused; reconnecting…"; };

  const setState = (badge, state, suppressed) => {
    badge.className = "state state-" + state;
    badge.dataset.state = state;
    badge.textContent = state + (suppressed ? " (suppressed)" : "");
  };

  // Each service row keeps its instances' counts by state; a change moves one.
  const moveCount = (holder, from, to) => {
    const counts = JSON.parse(holder.dataset.counts || "{}");
    if (counts[from]) counts[from] -= 1;
    if (!counts[from]) delete counts[from];
    counts[to] = (counts[to] || 0) + 1;
    holder.dataset.counts = JSON.stringify(counts);
    const worst = severity.find((s) => counts[s]) || "unknown";
    const badge = holder.querySelector(".state");
    if (badge) setState(badge, worst, false);
    const text = holder.querySelector(".counts");
    if (text) text.textContent = Object.keys(counts).sort().map((s) => counts[s] + " " + s).join(", ");
  };

  source.addEventListener("health.changed", (message) => {
    const data = JSON.parse(message.data).data;
    for (const holder of document.querySelectorAll("[data-service]")) {
      if (holder.dataset.service === data.service) moveCount(holder, data.from, data.to);
    }
    for (const row of document.querySelectorAll("[data-instance]")) {
      if (row.dataset.instance !== data.service + "/" + data.instance) continue;
      setState(row.querySelector(".health .state"), data.to, data.suppressed);
      row.querySelector(".reason").textContent = data.reason || "";
      row.querySelector(".since").textContent = "just now";
      row.querySelector(".failing").textContent = (data.failing || [])
        .map((f) => f.condition + " (got " + f.observed + ")").join("; ");
    }
    const changes = document.getElementById("change-list");
    if (changes) {
      const item = document.createElement("li");
      item.textContent = "just now " + data.instance + ": " + data.from + " → " + data.to +
        (data.reason ? " (" + data.reason + ")" : "");
      changes.prepend(item);
    }
    live.textContent = "Live: " + data.service + "/" + data.instance + " is " + data.to + ".";
  });

  // Workflow pages are small: on news, fetch the page again and swap <main>, at most once a second.
  const refresh = document.querySelector("[data-refresh=workflow]");
  if (!refresh) return;
  let pending = null;
  const reload = async () => {
    pending = null;
    const response = await fetch(location.href, { headers: { Accept: "text/html" } });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const main = page.querySelector("main");
    if (main) document.querySelector("main").replaceChildren(...main.childNodes);
    live.textContent = "Live: updated.";
  };
  const onWorkflow = (message) => {
    const data = JSON.parse(message.data).data;
    const only = refresh.dataset.process;
    if (only && data.process !== only) return;
    if (!pending) pending = setTimeout(reload, 1000);
  };
  for (const name of ["started", "step_completed", "completed", "failed", "compensated",
                      "cancelled", "deadline_missed"]) {
    source.addEventListener("workflow." + name, onWorkflow);
  }
})();

/* The researcher dashboard: refreshes every panel from dashboard.json every few seconds
 * (one snapshot of the database), and the preference plot whenever that snapshot's
 * version changed (an exclusion changes it as much as a new vote). */
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  if (!root) return;
  const REFRESH_MS = parseInt(root.dataset.refreshMs || "3000", 10);
  let lastVersion = root.dataset.version || "";

  const text = (id, value) => {
    const el = document.getElementById(id);
    if (el) el.textContent = String(value);
  };
  const fmt = (x, digits) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
  const fmtP = (x) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(3));

  function cell(row, value) {
    const td = document.createElement("td");
    td.textContent = value;
    row.appendChild(td);
    return td;
  }

  function drawBars() {
    document.querySelectorAll(".bar > span[data-fraction]").forEach((bar) => {
      bar.style.width = Math.min(100, 100 * parseFloat(bar.dataset.fraction || "0")).toFixed(1) + "%";
    });
  }

  function render(data) {
    text("updated-at", data.updated_at);
    const status = document.getElementById("study-status");
    status.textContent = data.status;
    status.className = "status-badge status-" + data.status;
    text("n-started", data.participants.started);
    text("n-completed", data.participants.completed);
    text("n-returned", data.participants.returned);
    text("n-excluded", data.exclusions.excluded);
    text("n-responses", data.responses);
    const reasons = Object.entries(data.exclusions.reasons).map(([rule, n]) => rule + ": " + n);
    text("exclusion-reasons", reasons.length ? reasons.join("; ") : "No exclusions.");
    const timing = document.getElementById("timing-quality");
    if (timing) {
      timing.textContent = data.timing.timed
        ? "Exposure timing: " + (100 * data.timing.share).toFixed(1) + " % of " + data.timing.timed +
          " frame-timed trials within one frame of the requested " + timing.dataset.exposureMs + " ms."
        : "Exposure timing: no frame-timed trials yet.";
    }
    if (data.display) text("display-coverage", data.display.text);
    text("votes-total", data.items.votes);
    text("votes-wanted", data.items.votes_wanted);
    text("items-complete", data.items.items_complete);

    const pairs = document.querySelector("#pair-progress tbody");
    pairs.replaceChildren(...data.items.pairs.map((p) => {
      const tr = document.createElement("tr");
      cell(tr, p.condition_a + " vs " + p.condition_b);
      cell(tr, p.items);
      cell(tr, p.votes + " / " + p.wanted);
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.dataset.fraction = String(p.wanted ? p.votes / p.wanted : 0);
      bar.appendChild(fill);
      cell(tr, "").appendChild(bar);
      cell(tr, p.complete);
      return tr;
    }));
    drawBars();
    const histogram = document.querySelector("#vote-histogram tbody tr");
    const cells = histogram.querySelectorAll("td");
    data.items.histogram.forEach((h, i) => { if (cells[i + 1]) cells[i + 1].textContent = String(h.items); });

    const preference = document.querySelector("#preference tbody");
    if (data.preference.length === 0) {
      const tr = document.createElement("tr");
      const td = cell(tr, "No votes yet.");
      td.colSpan = 7;
      td.className = "muted";
      preference.replaceChildren(tr);
    } else {
      preference.replaceChildren(...data.preference.map((r) => {
        const tr = document.createElement("tr");
        cell(tr, r.condition_a);
        cell(tr, r.condition_b);
        cell(tr, r.n);
        cell(tr, fmt(r.rate_a, 3));
        cell(tr, fmt(r.ci_low, 3) + "–" + fmt(r.ci_high, 3));
        cell(tr, fmtP(r.p_value));
        cell(tr, fmtP(r.p_holm));
        return tr;
      }));
    }
    const plot = document.getElementById("preference-plot");
    if (!data.preference.length) {
      plot.hidden = true;
    } else if (plot.hidden || data.version !== lastVersion) {
      plot.src = root.dataset.plotUrl + "?v=" + data.version;
      plot.hidden = false;
    }
    renderPeople(data);
    renderActive(data.active);
    lastVersion = data.version;
    root.dataset.version = data.version;
  }

  function renderActive(a) {
    const table = document.querySelector("#active-precision tbody");
    if (!a || !table) return;
    text("posterior-votes", a.posterior_votes === null ? 0 : a.posterior_votes);
    text("active-votes", a.votes);
    text("active-remaining", a.predicted_remaining === null ? "–" : a.predicted_remaining);
    table.replaceChildren(...a.conditions.map((c) => {
      const tr = document.createElement("tr");
      [c.condition, fmt(c.scale_jod, 2), fmt(c.half_width_jod, 2)].forEach((v) => cell(tr, v));
      return tr;
    }));
    const closed = document.getElementById("main-closed");
    closed.hidden = !a.closed_at;
    if (a.closed_at) {
      closed.textContent = "Main trials stopped at " + a.closed_at + ": " + a.closed_reason +
        ". Participants in progress finish their open trials.";
    }
  }

  function renderPeople(data) {
    const e = data.estimate;
    const estimate = document.getElementById("estimate");
    if (data.active) {
      estimate.textContent = "Active design: main trials stop by its rule (panel \"Active design\" " +
        "below); K = " + data.items.k + " is only the cap per item.";
    } else if (e.votes_remaining === 0) {
      estimate.textContent = "Every item has its K votes: the study can be closed.";
    } else {
      let line = "Still needed: " + e.participants_needed + " participants for " + e.votes_remaining +
        " main votes (" + Math.round(100 * e.kept_rate) + " % of completed participants kept so far)";
      if (e.median_minutes !== null) {
        line += "; a participation takes " + fmt(e.median_minutes, 1) + " min (median), " +
          fmt(e.participant_minutes_needed, 0) + " participant-minutes in all";
      }
      estimate.textContent = line + ".";
    }
    const body = document.querySelector("#participant-list tbody");
    if (!data.people.length) {
      const tr = document.createElement("tr");
      const td = cell(tr, "No participants yet.");
      td.colSpan = 9;
      td.className = "muted";
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...data.people.map((p) => {
      const tr = document.createElement("tr");
      [p.participant, p.prolific_pid || "–", p.status, p.started_at, p.finished_at || "–", p.answered,
        p.catch_accuracy === null ? "–" : fmt(p.catch_accuracy, 2), p.exclusion_reasons || "–",
        p.suggested_action].forEach((value) => cell(tr, value));
      return tr;
    }));
  }

  async function refresh() {
    try {
      const response = await fetch(root.dataset.url, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.ok) render(await response.json());
    } catch (error) {
      /* keep the last numbers; try again on the next tick */
    }
    setTimeout(refresh, REFRESH_MS);
  }

  drawBars();
  setTimeout(refresh, REFRESH_MS);
})();

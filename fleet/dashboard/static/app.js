// edgeloop fleet dashboard: live refresh, labelling keys, confirmations. No framework, no network beyond this server.
(function () {
  "use strict";
  const main = document.getElementById("live");
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  // ---- live refresh: re-render <main> from the server every refresh_s (the same data as /dashboard/api/*)
  let refreshes = 0;
  function busy() {
    const a = document.activeElement;
    return document.hidden || (a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName));
  }
  async function refresh() {
    if (busy()) return;
    try {
      const r = await fetch(location.href, {headers: {"X-Live": "1"}, credentials: "same-origin", redirect: "manual"});
      if (r.status !== 200) return;  // logged out or server gone: keep what is shown
      main.innerHTML = await r.text();
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      const stamp = document.getElementById("refreshed");
      if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) { /* network hiccup: try again next period */ }
  }
  if (main && main.dataset.live) {
    const period = Math.max(200, 1000 * parseFloat(main.dataset.live));
    setInterval(refresh, period);
  }

  // ---- confirmations for destructive actions
  document.addEventListener("submit", function (ev) {
    const f = ev.target;
    if (f.dataset && f.dataset.confirm && !window.confirm(f.dataset.confirm)) ev.preventDefault();
  }, true);

  // ---- labelling: click a class or press its key; posts in the background and moves on
  if (!main || !main.dataset.labelling) return;
  function cards() { return Array.from(document.querySelectorAll(".label-card")); }
  function selected() { return document.querySelector(".label-card.selected") || cards()[0]; }
  function select(card) {
    cards().forEach(c => c.classList.remove("selected"));
    if (card) { card.classList.add("selected"); card.scrollIntoView({block: "nearest"}); }
  }
  function bump(id, delta) {
    const el = document.getElementById(id);
    if (el) el.textContent = String(Math.max(0, parseInt(el.textContent, 10) + delta));
  }
  async function send(card, label) {
    const body = new URLSearchParams({sample_id: card.dataset.sample, label: label, csrf_token: csrf});
    const r = await fetch(card.action, {method: "POST", body: body, credentials: "same-origin",
      headers: {"Accept": "application/json", "X-CSRF-Token": csrf}});
    const out = await r.json().catch(() => ({}));
    if (!r.ok) { card.classList.add("failed"); card.title = out.error || out.detail || r.statusText; return; }
    const next = card.nextElementSibling && card.nextElementSibling.classList.contains("label-card")
      ? card.nextElementSibling : card.previousElementSibling;
    card.remove();
    bump("unlabelled-count", -1); bump("labelled-count", 1); bump("needed-count", -1);
    document.body.dataset.labelled = String(parseInt(document.body.dataset.labelled || "0", 10) + 1);
    select(next && next.classList.contains("label-card") ? next : null);
    if (!cards().length) location.reload();
  }
  document.addEventListener("click", function (ev) {
    const btn = ev.target.closest("button.cls");
    const card = ev.target.closest(".label-card");
    if (card) select(card);
    if (btn && card) { ev.preventDefault(); send(card, btn.value); }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const card = selected();
    if (!card) return;
    if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
      const list = cards(); const i = list.indexOf(card);
      select(list[Math.min(list.length - 1, Math.max(0, i + (ev.key === "ArrowRight" ? 1 : -1)))]);
      ev.preventDefault();
      return;
    }
    const btn = card.querySelector('button.cls[data-key="' + CSS.escape(ev.key) + '"]');
    if (btn) { ev.preventDefault(); send(card, btn.value); }
  });
})();

// What every page shares: the phone menu, dismissible flash messages, confirmations, status words,
// and live regions. No inline scripts or handlers anywhere: pages describe what they need with
// data- attributes, so a strict Content-Security-Policy holds.
"use strict";

const CML = (() => {
  const FLASH_SECONDS = 10;
  const words = JSON.parse(document.getElementById("status-words").textContent);

  // The same words, colours and icons as the server's status_badge macro (web/status_words.py).
  function statusBadge(el, value) {
    const fallback = { word: String(value || "Unknown").replace(/^(ENGINE|APPLICATION)_/, "").replace(/_/g, " ").toLowerCase(),
                       tone: "idle", icon: "○" };
    const s = words[value] || fallback;
    el.className = "status tone-" + s.tone;
    el.title = value;
    el.dataset.status = value;
    el.dataset.icon = s.icon;
    el.textContent = s.word.charAt(0).toUpperCase() + s.word.slice(1);
  }

  function dropStaleFlashes() {
    document.querySelectorAll("[data-flash].ok, [data-flash].warn").forEach((el) => el.remove());
  }

  // Live regions: elements with data-live-region and an id are re-rendered by the server whenever
  // the page's live stream (body[data-live]) reports a change, so a page never mixes old and new
  // state. A region the user is typing in waits until focus leaves it.
  function startLive(url) {
    let timer = null;
    let running = false;
    let again = false;
    const pending = new Map();

    async function refresh() {
      if (running) { again = true; return; }
      running = true;
      try {
        const resp = await fetch(window.location.href, { headers: { "X-CML-Live": "1" }, credentials: "same-origin" });
        if (!resp.ok) return;
        const fresh = new DOMParser().parseFromString(await resp.text(), "text/html");
        let changed = false;
        fresh.querySelectorAll("[data-live-region][id]").forEach((next) => {
          const current = document.getElementById(next.id);
          if (!current || current.innerHTML === next.innerHTML) return;
          changed = true;
          if (current.contains(document.activeElement) && document.activeElement.matches("input, select, textarea")) {
            pending.set(next.id, next);
            return;
          }
          swap(current, next);
        });
        if (changed) {
          dropStaleFlashes();
          document.dispatchEvent(new CustomEvent("cml:live-updated"));
        }
      } catch (err) {
        // The next change, or the reconnect, tries again.
      } finally {
        running = false;
        if (again) { again = false; schedule(); }
      }
    }

    function swap(current, next) {
      const focusedId = current.contains(document.activeElement) ? document.activeElement.id : "";
      const imported = document.importNode(next, true);
      current.replaceWith(imported);
      if (focusedId) { const el = document.getElementById(focusedId); if (el) el.focus(); }
    }

    document.addEventListener("focusout", () => {
      setTimeout(() => {
        for (const [id, next] of pending) {
          const current = document.getElementById(id);
          if (current && !current.contains(document.activeElement)) { swap(current, next); pending.delete(id); }
        }
      }, 0);
    });

    function schedule() {
      clearTimeout(timer);
      timer = setTimeout(refresh, 150);
    }

    const source = new EventSource(url);
    // Each (re)connection refreshes once: a change made while the page loaded or while the
    // stream was away is not lost.
    source.addEventListener("open", schedule);
    source.addEventListener("change", schedule);
    window.addEventListener("pagehide", () => source.close());
  }

  document.addEventListener("DOMContentLoaded", () => {
    const toggle = document.querySelector(".menu-toggle");
    if (toggle) {
      toggle.addEventListener("click", () => {
        const open = toggle.getAttribute("aria-expanded") !== "true";
        toggle.setAttribute("aria-expanded", String(open));
        document.getElementById(toggle.getAttribute("aria-controls")).classList.toggle("open", open);
      });
    }
    const live = document.body.dataset.live;
    if (live) startLive(live);
    // A success message has said its piece after a while, even where no state moves on; errors
    // stay until dismissed.
    if (document.querySelector("[data-flash].ok")) setTimeout(dropStaleFlashes, FLASH_SECONDS * 1000);
  });

  document.addEventListener("click", (event) => {
    const close = event.target.closest(".flash-close");
    if (close) close.parentElement.remove();
  });

  // <form data-confirm="Delete x?">: ask first.
  // <form data-busy="Doing…">: work that takes seconds says so on its button meanwhile.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
    const button = form.dataset.busy && form.querySelector("button[type=submit]");
    if (button) {
      button.disabled = true;
      button.textContent = form.dataset.busy;
      form.setAttribute("aria-busy", "true");
    }
  });

  // <select data-shows="prefix">: show the elements [data-show-for="prefix:value"] of the chosen
  // value and hide (and disable) the others, so a form sends only the fields that apply.
  function applyChoice(control) {
    const group = control.dataset.shows;
    const value = control.type === "radio" ? (document.querySelector(`input[name="${control.name}"]:checked`) || {}).value : control.value;
    document.querySelectorAll(`[data-show-for^="${group}:"]`).forEach((el) => {
      const on = el.dataset.showFor.split(":")[1].split(",").includes(value);
      el.hidden = !on;
      el.querySelectorAll("input, select, textarea").forEach((input) => { input.disabled = !on; });
    });
  }
  document.addEventListener("change", (event) => { if (event.target.dataset && event.target.dataset.shows) applyChoice(event.target); });
  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-shows]").forEach((el) => { if (el.type !== "radio" || el.checked) applyChoice(el); });
  });

  return { statusBadge, dropStaleFlashes };
})();

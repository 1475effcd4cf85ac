// The model page's test request: the JSON in the text box goes to the page's own test route
// (the signed-in user's cookie and the form's CSRF token), which calls the model as POST /model
// does; the answer, or the error's message, is shown under the box. The last request that
// worked is remembered in this browser and put back in the box next time.
"use strict";

(() => {
  const form = document.getElementById("test-form");
  if (!form) return;
  const input = document.getElementById("test-input");
  const button = document.getElementById("test-send");
  const state = document.getElementById("test-state");
  const output = document.getElementById("test-output");
  const memoryKey = "cml-model-request:" + form.dataset.model;

  try {
    const remembered = window.localStorage.getItem(memoryKey);
    if (remembered) input.value = remembered;
  } catch (err) { /* storage may be off: the example stays */ }

  function show(ok, summary, text) {
    state.textContent = summary;
    state.className = ok ? "status tone-ok" : "status tone-bad";
    output.hidden = text === "";
    output.textContent = text;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      JSON.parse(input.value);
    } catch (err) {
      show(false, "The request is not valid JSON: " + err.message, "");
      return;
    }
    button.disabled = true;
    state.className = "muted";
    state.textContent = "sending…";
    try {
      const resp = await fetch(form.action, {
        method: "POST", body: new URLSearchParams(new FormData(form)), credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!(resp.headers.get("Content-Type") || "").includes("application/json")) {
        show(false, `HTTP ${resp.status}: reload the page and try again (the form may have expired)`, "");
        return;
      }
      const body = await resp.json();
      if (body.success) {
        show(true, `${resp.status} OK · replica ${body.ReplicaID}`, JSON.stringify(body.response, null, 2));
        try { window.localStorage.setItem(memoryKey, input.value); } catch (err) { /* not remembered */ }
      } else {
        const message = (body.error && body.error.message) || "the model did not answer";
        show(false, `${resp.status}: ${message}`, JSON.stringify(body, null, 2));
      }
    } catch (err) {
      show(false, "The request could not be sent: " + err.message, "");
    } finally {
      button.disabled = false;
    }
  });
})();

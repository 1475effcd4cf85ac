// A workload's live console (server-sent events: status and log) and, for sessions, the terminal
// (xterm.js over a WebSocket: binary frames carry terminal bytes, text frames JSON control).
// The page describes what it needs on #workload-stream: data-events-url, and for a session
// data-terminal-url and data-transcript-url. The status a person reads is in the page's live
// regions (app.js); this script follows the status only to know when the terminal can open.
"use strict";

(() => {
  const config = document.getElementById("workload-stream");
  if (!config) return;
  const options = config.dataset;
  const consoleEl = document.getElementById("console");
  const stateEl = document.getElementById("terminal-state");
  const terminalEl = document.getElementById("terminal");
  const finished = ["ENGINE_STOPPED", "ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_SKIPPED"];
  let status = options.status || "";
  let socket = null;
  let term = null;
  let replayed = false;

  function setState(text) { if (stateEl) stateEl.textContent = text; }

  function makeTerminal(readOnly) {
    if (term) return term;
    term = new Terminal({ cursorBlink: !readOnly, disableStdin: readOnly, fontSize: 13, scrollback: 5000, convertEol: false,
                          fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" });
    const fit = new FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(terminalEl);
    fit.fit();
    window.addEventListener("resize", () => fit.fit());
    const encoder = new TextEncoder();
    term.onData((data) => { if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data)); });
    term.onResize(({ cols, rows }) => sendResize(cols, rows));
    window.cmlTerminal = term;  // lets end-to-end tests read the screen
    return term;
  }

  // A session that has ended keeps its terminal's last screen, read-only.
  async function showLastScreen() {
    if (replayed || !options.transcriptUrl || !terminalEl) return;
    replayed = true;
    if (term) {  // this page watched it end: the screen is already there
      term.options.disableStdin = true;
      term.options.cursorBlink = false;
      setState("the session has ended; its terminal is read-only");
      return;
    }
    try {
      const resp = await fetch(options.transcriptUrl, { credentials: "same-origin" });
      const data = new Uint8Array(await resp.arrayBuffer());
      if (!resp.ok || data.length === 0) { setState("the session has ended"); return; }
      makeTerminal(true).write(data);
      setState("the session has ended; its terminal's last screen is shown read-only");
    } catch (err) {
      setState("the session has ended");
    }
  }

  function onStatus(session) {
    status = session.status;
    if (status === "ENGINE_RUNNING" && options.terminalUrl && !socket) connectTerminal();
    if (finished.includes(status) && !socket) showLastScreen();
  }

  const events = new EventSource(options.eventsUrl);
  events.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
  events.addEventListener("log", (e) => {
    if (!consoleEl) return;
    const atBottom = consoleEl.scrollTop + consoleEl.clientHeight >= consoleEl.scrollHeight - 4;
    consoleEl.textContent += JSON.parse(e.data);
    if (atBottom) consoleEl.scrollTop = consoleEl.scrollHeight;
  });
  events.addEventListener("end", () => events.close());
  window.addEventListener("pagehide", () => events.close());

  function connectTerminal() {
    makeTerminal(false);
    const url = new URL(options.terminalUrl, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    setState("connecting…");
    socket.onopen = () => {
      setState("connected");
      sendResize(term.cols, term.rows);
      term.focus();
    };
    socket.onmessage = (e) => {
      if (typeof e.data === "string") {
        const message = JSON.parse(e.data);
        if (message.type === "error") setState(message.message);
      } else {
        term.write(new Uint8Array(e.data));
      }
    };
    socket.onclose = (e) => {
      socket = null;
      setState(e.reason || "disconnected");
      if (finished.includes(status) || e.code === 4000) { showLastScreen(); return; }
      // The shell can end while the session runs on (exit typed): offer a new one shortly.
      if (status === "ENGINE_RUNNING" && e.code !== 4001) setTimeout(() => { if (!socket && status === "ENGINE_RUNNING") connectTerminal(); }, 1500);
    };
  }

  function sendResize(cols, rows) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols, rows }));
  }

  if (status === "ENGINE_RUNNING" && options.terminalUrl) connectTerminal();
  else if (finished.includes(status)) showLastScreen();
})();

// The session page: live status and console output over server-sent events, and the terminal
// (xterm.js) over a WebSocket. Binary frames carry terminal bytes; text frames carry JSON control.
"use strict";

function startSessionPage(options) {
  const statusEl = document.getElementById("session-status");
  const reasonEl = document.getElementById("session-reason");
  const consoleEl = document.getElementById("console");
  const stopButton = document.getElementById("stop-button");
  const stateEl = document.getElementById("terminal-state");
  const finished = ["ENGINE_STOPPED", "ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_SKIPPED"];
  let status = statusEl.textContent.trim();
  let socket = null;
  let term = null;

  function showStatus(session) {
    status = session.status;
    statusEl.textContent = status;
    statusEl.className = "status status-" + status.toLowerCase();
    reasonEl.textContent = session.reason || "";
    if (stopButton) stopButton.disabled = finished.includes(status) || status === "ENGINE_STOPPING";
    if (status === "ENGINE_RUNNING" && options.terminalUrl && !socket) connectTerminal();
    if (stateEl && finished.includes(status) && !socket) stateEl.textContent = "the session has ended";
  }

  const events = new EventSource(options.eventsUrl);
  events.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
  events.addEventListener("log", (e) => {
    const atBottom = consoleEl.scrollTop + consoleEl.clientHeight >= consoleEl.scrollHeight - 4;
    consoleEl.textContent += JSON.parse(e.data);
    if (atBottom) consoleEl.scrollTop = consoleEl.scrollHeight;
  });
  events.addEventListener("end", () => events.close());

  function connectTerminal() {
    if (!term) {
      term = new Terminal({ cursorBlink: true, fontSize: 13, scrollback: 5000,
                            fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" });
      const fit = new FitAddon.FitAddon();
      term.loadAddon(fit);
      term.open(document.getElementById("terminal"));
      fit.fit();
      window.addEventListener("resize", () => fit.fit());
      const encoder = new TextEncoder();
      term.onData((data) => { if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data)); });
      term.onResize(({ cols, rows }) => sendResize(cols, rows));
      window.cmlTerminal = term;  // lets end-to-end tests read the screen
    }
    const url = new URL(options.terminalUrl, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    stateEl.textContent = "connecting…";
    socket.onopen = () => {
      stateEl.textContent = "connected";
      sendResize(term.cols, term.rows);
      term.focus();
    };
    socket.onmessage = (e) => {
      if (typeof e.data === "string") {
        const message = JSON.parse(e.data);
        if (message.type === "error") stateEl.textContent = message.message;
      } else {
        term.write(new Uint8Array(e.data));
      }
    };
    socket.onclose = (e) => {
      socket = null;
      stateEl.textContent = e.reason || "disconnected";
      // The shell can end while the session runs on (exit typed): offer a new one shortly.
      if (status === "ENGINE_RUNNING" && e.code !== 4001) setTimeout(() => { if (!socket && status === "ENGINE_RUNNING") connectTerminal(); }, 1500);
    };
  }

  function sendResize(cols, rows) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols, rows }));
  }

  if (status === "ENGINE_RUNNING" && options.terminalUrl) connectTerminal();
}

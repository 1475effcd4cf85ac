// Charts (experiment run and run comparison pages, site usage), drawn with the vendored dygraphs.
// The points come in the page itself, as JSON in <script type="application/json" id="chart-series">:
//   run page:     {"<metric key>": [[step, value], ...], ...}, one chart per .chart[data-key]
//   compare page: {"<run name>": [[step, value], ...], ...}, one chart with a line per run
//   usage page:   {"cpu": [[unix seconds, amount], ...], ...}, one chart per .chart[data-key]
// A NaN point arrives as null and is drawn as a gap.
"use strict";

(() => {
  const source = document.getElementById("chart-series");
  if (!source || typeof Dygraph === "undefined") return;
  const series = JSON.parse(source.textContent);
  const common = {
    xlabel: "step", strokeWidth: 1.5, drawPoints: true, pointSize: 2, legend: "follow",
    axes: { x: { valueFormatter: (s) => "step " + s } }, digitsAfterDecimal: 4,
  };

  function empty(element, text) {
    element.textContent = text;
    element.classList.add("muted");
  }

  for (const element of document.querySelectorAll(".chart[data-chart='metric']")) {
    const points = series[element.dataset.key] || [];
    if (points.length === 0) { empty(element, "No points."); continue; }
    // A single point (a final score) gets a dot large enough to see.
    new Dygraph(element, points, { ...common, labels: ["step", element.dataset.key], ylabel: element.dataset.key,
                                   pointSize: points.length === 1 ? 5 : 2 });
  }

  for (const element of document.querySelectorAll(".chart[data-chart='usage']")) {
    const points = (series[element.dataset.key] || []).map(([at, value]) => [new Date(at * 1000), value]);
    if (points.length === 0) { empty(element, "No points."); continue; }
    new Dygraph(element, points, { labels: ["time", element.dataset.label], ylabel: element.dataset.label,
                                   strokeWidth: 1.5, fillGraph: true, legend: "follow", includeZero: true,
                                   digitsAfterDecimal: 2 });
  }

  const compare = document.querySelector(".chart[data-chart='compare']");
  if (compare) {
    const names = Object.keys(series);
    const byStep = new Map();
    names.forEach((name, column) => {
      for (const [step, value] of series[name]) {
        if (!byStep.has(step)) byStep.set(step, new Array(names.length).fill(null));
        byStep.get(step)[column] = value;
      }
    });
    const rows = [...byStep.entries()].sort((a, b) => a[0] - b[0]).map(([step, values]) => [step, ...values]);
    if (rows.length === 0) empty(compare, "None of these runs logged this metric.");
    else new Dygraph(compare, rows, { ...common, labels: ["step", ...names], ylabel: compare.dataset.label,
                                      connectSeparatedPoints: true, legend: "always" });
  }
})();

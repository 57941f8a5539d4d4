// massact's report page: the token view, the interactive figures (SVG), sortable tables, navigation. No library, no request.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("massact-data").textContent);
  var $ = function (id) { return document.getElementById(id); };

  // A number for reading, as massact's Python writes it: 24494 -> 24.5k.
  function fmt(x) {
    if (x === null || x === undefined) return "-";
    var a = Math.abs(x), units = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (var i = 0; i < units.length; i++) {
      if (a >= units[i][0] * 0.9995) return +(x / units[i][0]).toPrecision(3) + units[i][1];
    }
    return a >= 1e-3 || a === 0 ? String(+x.toPrecision(3)) : x.toExponential(1);
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; }); }

  function showTip(tip, text, event) {
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = (event.clientX + 14) + "px";
    tip.style.top = (event.clientY + 14) + "px";
  }

  // Jump to a part of the report: open the folded table that holds it, scroll, flash it.
  function jump(target) {
    if (!target) return false;
    if (target.classList.contains("anchor")) target = target.parentElement;  // flash what the anchor marks
    for (var node = target; node; node = node.parentElement) if (node.tagName === "DETAILS") node.open = true;
    target.scrollIntoView({ block: "center" });
    target.classList.remove("flash"); void target.offsetWidth; target.classList.add("flash");
    return true;
  }
  // A block or a dim: flash its attribution, then scroll to its anatomy (the attribution follows it); else its lifeline
  // (a dim no MLP writes) or its row of the layer scan (a block that writes nothing massive).
  function go(kind, which) {
    var anatomy = $("anatomy-" + kind + "-" + which), attribution = $("attribution-" + kind + "-" + which);
    if (attribution) jump(attribution);
    if (anatomy) jump(anatomy);
    if (!anatomy && !attribution) jump($(kind === "dim" ? "lifeline-dim-" + which : "layers-block-" + which));
  }
  function goBlock(block) { go("block", block); }
  document.addEventListener("click", function (event) {
    var link = event.target.closest("a[href^='#']");
    if (!link) return;
    event.preventDefault();
    if (link.dataset.block) goBlock(link.dataset.block);
    else if (link.dataset.dim) go("dim", link.dataset.dim);
    else jump(document.getElementById(link.getAttribute("href").slice(1)));
  });

  // Sortable tables: click a header; numbers sort as numbers ("+24,494.3", "1,234x", "12.5%").
  function cellValue(row, index) {
    var text = row.cells[index] ? row.cells[index].textContent.trim() : "";
    var number = parseFloat(text.replace(/[,+x%]/g, ""));
    return isNaN(number) ? text : number;
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      th.addEventListener("click", function () {
        var order = th.dataset.order === "asc" ? "desc" : "asc";
        Array.prototype.forEach.call(th.parentElement.cells, function (other) { delete other.dataset.order; });
        th.dataset.order = order;
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index), y = cellValue(b, index);
          var c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
          return order === "asc" ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });

  // The token view.
  var tv = data.tokens, tvTip = $("tv-tip");
  function tokenColour(value, largest) {
    var t = largest > 0 ? Math.pow(Math.log1p(Math.abs(value)) / Math.log1p(largest), 2) : 0;  // squared: ordinary tokens stay pale
    return value >= 0 ? "rgba(214, 39, 40, " + t.toFixed(3) + ")" : "rgba(31, 90, 200, " + t.toFixed(3) + ")";
  }
  function drawTokens() {
    var d = +$("tv-dim").value, block = +$("tv-block").value, largest = 0;
    $("tv-block-out").textContent = block;
    tv.texts.forEach(function (t) { t.values[d].forEach(function (row) { row.forEach(function (v) { largest = Math.max(largest, Math.abs(v)); }); }); });
    Array.prototype.forEach.call(document.querySelectorAll("#tv-texts .tok"), function (span) {
      var value = tv.texts[+span.dataset.t].values[d][block][+span.dataset.p];
      span.dataset.value = value;
      span.style.background = tokenColour(value, largest);
      span.style.color = Math.log1p(Math.abs(value)) > 0.6 * Math.log1p(largest) ? "#fff" : "";
    });
  }
  if (tv) {
    var sinks = {};
    tv.sinks.forEach(function (s) { sinks[s[0] + ":" + s[1]] = true; });
    tv.dims.forEach(function (dim, i) { $("tv-dim").insertAdjacentHTML("beforeend", '<option value="' + i + '">' + dim + "</option>"); });
    var blocks = tv.texts[0].values[0].length, first = data.lifelines.filter(function (l) { return l.dim === tv.dims[0]; })[0];
    $("tv-block").max = blocks - 1;
    $("tv-block").value = first ? first.born : 0;
    $("tv-texts").innerHTML = tv.texts.map(function (t, ti) {
      return '<div class="tv-text"><span class="label">text ' + t.index + "</span>" + t.tokens.map(function (tok, p) {
        var sink = sinks[t.index + ":" + p] ? " sink" : "";
        return '<span class="tok' + sink + '" data-t="' + ti + '" data-p="' + p + '">' + esc(tok) + "</span>";
      }).join("") + "</div>";
    }).join("");
    $("tv-texts").addEventListener("mouseover", function (event) {
      var span = event.target.closest(".tok");
      if (!span) return;
      var t = tv.texts[+span.dataset.t], p = +span.dataset.p;
      showTip(tvTip, "text " + t.index + ", position " + p + " " + JSON.stringify(t.tokens[p]) + (span.classList.contains("sink") ? " (sink token)" : "") +
        "\ndim " + tv.dims[+$("tv-dim").value] + " at block " + $("tv-block").value + ": " + fmt(+span.dataset.value) +
        " (" + (+span.dataset.value).toLocaleString("en") + ")", event);
    });
    $("tv-texts").addEventListener("mouseout", function () { tvTip.hidden = true; });
    $("tv-dim").addEventListener("change", drawTokens);
    $("tv-block").addEventListener("input", drawTokens);
    drawTokens();
  } else {
    $("tv-texts").textContent = "Nothing massive: no token view.";
  }

  // Figures: one SVG per chart, a transparent strip per block that shows its numbers and jumps to it.
  var figTip = $("fig-tip"), W = 920, H = 270, M = { left: 64, right: 16, top: 34, bottom: 34 };
  function chart(element, n, series, log, describe) {
    var values = [];
    series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null && (!log || Math.abs(v) > 0)) values.push(log ? Math.abs(v) : v); }); });
    if (!values.length) { element.textContent = "No data."; return; }
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    var tick = 0;  // a linear axis: round ticks (1, 2 or 5 x a power of ten), the ends on them
    if (log) { lo = Math.pow(10, Math.floor(Math.log10(lo))); hi = Math.pow(10, Math.ceil(Math.log10(hi))); }
    else {
      lo = Math.min(0, lo); hi = Math.max(0, hi); if (hi === lo) hi = lo + 1;
      var rough = (hi - lo) / 4, power = Math.pow(10, Math.floor(Math.log10(rough)));
      tick = power * [1, 2, 5, 10].filter(function (m) { return m * power >= rough; })[0];
      lo = Math.floor(lo / tick) * tick; hi = Math.ceil(hi / tick) * tick;
    }
    var pw = W - M.left - M.right, ph = H - M.top - M.bottom, step = pw / n;
    var x = function (i) { return M.left + step * (i + 0.5); };
    var y = function (v) {
      var f = log ? (Math.log10(Math.max(Math.abs(v), lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)) : (v - lo) / (hi - lo);
      return M.top + ph * (1 - f);
    };
    var out = ['<svg width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H + '" font-size="11">'];
    var ticks = [];
    if (log) for (var e = Math.log10(lo); e <= Math.log10(hi) + 1e-9; e++) ticks.push(Math.pow(10, e));
    else for (var k = 0; lo + k * tick <= hi + tick * 1e-9; k++) ticks.push(+(lo + k * tick).toPrecision(12));
    ticks.forEach(function (t) {
      out.push('<line x1="' + M.left + '" x2="' + (W - M.right) + '" y1="' + y(t) + '" y2="' + y(t) + '" stroke="#eee"/>');
      out.push('<text x="' + (M.left - 6) + '" y="' + (y(t) + 4) + '" text-anchor="end">' + fmt(t) + "</text>");
    });
    for (var i = 0; i < n; i += Math.max(1, Math.round(n / 30))) out.push('<text x="' + x(i) + '" y="' + (H - M.bottom + 14) + '" text-anchor="middle">' + i + "</text>");
    out.push('<text x="' + (M.left + pw / 2) + '" y="' + (H - 4) + '" text-anchor="middle">block</text>');
    if (!log && lo < 0) out.push('<line x1="' + M.left + '" x2="' + (W - M.right) + '" y1="' + y(0) + '" y2="' + y(0) + '" stroke="#999"/>');
    var bars = series.filter(function (s) { return s.kind === "bar"; }), width = step * 0.8 / Math.max(bars.length, 1);
    series.slice().reverse().forEach(function (s) {  // the first series last, on top
      if (s.kind === "bar") {
        var offset = bars.indexOf(s) * width - step * 0.4;
        s.values.forEach(function (v, i) {
          if (v === null) return;
          var top = Math.min(y(v), y(0)), height = Math.abs(y(v) - y(0));
          out.push('<rect x="' + (x(i) + offset) + '" y="' + top + '" width="' + width + '" height="' + height + '" fill="' + s.color + '" opacity="0.75"/>');
        });
      } else {
        var points = s.values.map(function (v, i) { return v === null ? null : x(i) + "," + y(v); }).filter(Boolean).join(" ");
        out.push('<polyline points="' + points + '" fill="none" stroke="' + s.color + '" stroke-width="2"' + (s.dash ? ' stroke-dasharray="4 3"' : "") + "/>");
      }
    });
    // The legend sits above the plot, never over its lines.
    var lx = M.left;
    series.forEach(function (s) {
      out.push('<rect x="' + lx + '" y="10" width="12" height="10" fill="' + s.color + '"/><text x="' + (lx + 16) + '" y="19">' + esc(s.name) + "</text>");
      lx += 28 + 6.5 * s.name.length;
    });
    for (var b = 0; b < n; b++) out.push('<rect class="hit" data-block="' + b + '" x="' + (M.left + step * b) + '" y="' + M.top + '" width="' + step + '" height="' + ph + '"/>');
    out.push("</svg>");
    element.innerHTML = out.join("");
    element.onmousemove = function (event) {
      var hit = event.target.closest(".hit");
      if (hit) showTip(figTip, describe(+hit.dataset.block), event); else figTip.hidden = true;
    };
    element.onmouseleave = function () { figTip.hidden = true; };
    element.onclick = function (event) { var hit = event.target.closest(".hit"); if (hit) goBlock(hit.dataset.block); };
  }

  var L = data.layers, n = L.length;
  // What this block's attention and MLP add to the strongest dim at its carrier (its lifeline).
  function parts(block) {
    var line = data.lifelines[0], step = line && line.steps[block];
    return step ? "\ndim " + line.dim + " at its carrier: " + fmt(step[1]) + " (attention " + fmt(step[2]) + ", MLP " + fmt(step[3]) + ")" : "";
  }
  var nth = function (k) { return L.map(function (s) { return s.top[k] ? s.top[k][0] : null; }); };
  chart($("fig-profile"), n, [
    { name: "top1 |a|", color: "#d62728", values: nth(0) }, { name: "top2", color: "#ff7f0e", values: nth(1) },
    { name: "top3", color: "#bcbd22", values: nth(2) }, { name: "median |a|", color: "#7f7f7f", values: L.map(function (s) { return s.median; }), dash: true },
  ], true, function (b) {
    var s = L[b];
    return "block " + b + "\n" + s.top.map(function (t, k) { return "top" + (k + 1) + ": " + fmt(t[0]) + " (dim " + t[1] + ")"; }).join("\n") +
      "\nmedian |a|: " + fmt(s.median) + (s.top[0] ? "\ntop1 / median: " + fmt(Math.abs(s.top[0][0]) / s.median) + "x" : "") +
      parts(b) + "\nclick: this block's anatomy and attribution";
  });

  function drawLifeline() {
    var line = data.lifelines[+$("fig-dim").value];
    if (!line) { $("fig-lifeline").textContent = "Nothing massive: no lifeline."; return; }
    var col = function (k) { return line.steps.map(function (s) { return s[k]; }); };
    chart($("fig-lifeline"), line.steps.length, [
      { name: "attention adds", color: "#1f77b4", values: col(2), kind: "bar" }, { name: "MLP adds", color: "#2ca02c", values: col(3), kind: "bar" },
      { name: "value of dim " + line.dim, color: "#d62728", values: col(1) },
    ], false, function (b) {
      var s = line.steps[b];
      return "dim " + line.dim + " at text " + line.text + " position " + line.position + " " + JSON.stringify(line.token) + ", block " + s[0] +
        (s[0] === line.born ? " (birth)" : "") + (line.erased.indexOf(s[0]) >= 0 ? " (erased here)" : "") +
        "\nvalue: " + fmt(s[1]) + "\ninput: " + fmt(s[4]) + "\nattention adds: " + fmt(s[2]) + "\nMLP adds: " + fmt(s[3]);
    });
  }
  data.lifelines.forEach(function (l, i) { $("fig-dim").insertAdjacentHTML("beforeend", '<option value="' + i + '">dim ' + l.dim + "</option>"); });
  $("fig-dim").addEventListener("change", drawLifeline);
  drawLifeline();

  var trig = data.triggers[0];
  if (trig) {
    var names = trig.sources.map(function (s) { return s[0]; });
    chart($("fig-trigger"), names.length, [
      { name: "at " + JSON.stringify(trig.token) + " (pos " + trig.position + ")", color: "#d62728", values: trig.sources.map(function (s) { return s[1]; }), kind: "bar" },
      { name: "mean elsewhere", color: "#7f7f7f", values: trig.sources.map(function (s) { return s[2]; }), kind: "bar" },
    ], false, function (i) {
      var s = trig.sources[i];
      return "block " + trig.layer + " neuron " + trig.neuron + " " + (trig.site === "mlp_gate" ? "gate" : "pre-activation") + " (dim " + trig.dim +
        ")\nsource " + (i + 1) + ": " + s[0] + "\nat the massive token: " + fmt(s[1]) + "\nmean elsewhere: " + fmt(s[2]);
    });
    // Here the x axis counts sources, not blocks: name them, and a click opens the writing block.
    var labels = $("fig-trigger").querySelectorAll("svg > text[text-anchor='middle']");
    Array.prototype.forEach.call(labels, function (label) {
      if (/^\d+$/.test(label.textContent)) label.textContent = names[+label.textContent].replace(/^block /, "b");
      else if (label.textContent === "block") label.textContent = "source (b = block)";
    });
    $("fig-trigger").onclick = function () { goBlock(trig.layer); };
  } else {
    $("fig-trigger").textContent = "No neuron writes a massive value: no trigger.";
  }
  document.body.setAttribute("data-ready", "1");
})();

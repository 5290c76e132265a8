(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("report-config").textContent);
  var GH = cfg.grid[0], GW = cfg.grid[1], LUT = cfg.lut, STRIDE = 7;
  var opacity = cfg.alpha, lastCard = null;
  var deck = document.getElementById("cards");

  function attOf(card) {
    if (!card._att) { card._att = JSON.parse(card.dataset.att); }
    return card._att;
  }
  function cubic(x) {  // PIL's bicubic kernel (a = -0.5)
    x = Math.abs(x);
    if (x < 1) { return (1.5 * x - 2.5) * x * x + 1; }
    return x < 2 ? (((x - 5) * x + 8) * x - 4) * -0.5 : 0;
  }
  function taps(n, cells) {  // PIL's resampling coefficients: cells -> n pixels
    var scale = cells / n, fs = Math.max(scale, 1), support = 2 * fs, out = [];
    for (var p = 0; p < n; p++) {
      var center = (p + 0.5) * scale, ws = [], sum = 0;
      var lo = Math.max(Math.trunc(center - support + 0.5), 0);
      var hi = Math.min(Math.trunc(center + support + 0.5), cells);
      for (var j = lo; j < hi; j++) {
        ws.push(cubic((j - center + 0.5) / fs)); sum += ws[ws.length - 1];
      }
      for (var k = 0; k < ws.length && sum; k++) { ws[k] /= sum; }
      out.push({lo: lo, w: ws});
    }
    return out;
  }
  function upsample(row, w, h) {  // = visualize.upsample_attention: bicubic, clip, max 1
    var tx = taps(w, GW), ty = taps(h, GH), tmp = new Float64Array(GH * w);
    var heat = new Float32Array(w * h), peak = 0, x, y, j, v, t;
    for (var r = 0; r < GH; r++) {
      for (x = 0; x < w; x++) {
        t = tx[x]; v = 0;
        for (j = 0; j < t.w.length; j++) { v += row[r * GW + t.lo + j] * t.w[j]; }
        tmp[r * w + x] = v;
      }
    }
    for (y = 0; y < h; y++) {
      t = ty[y];
      for (x = 0; x < w; x++) {
        v = 0;
        for (j = 0; j < t.w.length; j++) { v += tmp[(t.lo + j) * w + x] * t.w[j]; }
        v = Math.max(v, 0); heat[y * w + x] = v;
        if (v > peak) { peak = v; }
      }
    }
    for (var k = 0; peak > 0 && k < heat.length; k++) { heat[k] /= peak; }
    return heat;
  }
  function drawMap(canvas, row) {  // jet colour, alpha = opacity * m (overlay_attention)
    var w = canvas.width, h = canvas.height, heat = upsample(row, w, h);
    var ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h), px = img.data;
    for (var k = 0; k < w * h; k++) {
      var m = heat[k], ci = Math.round(m * 255) * 3, o = k * 4;
      px[o] = LUT[ci]; px[o + 1] = LUT[ci + 1]; px[o + 2] = LUT[ci + 2];
      px[o + 3] = Math.round(opacity * m * 255);
    }
    ctx.putImageData(img, 0, 0);
    canvas._drawn = {token: row, opacity: opacity};
  }
  function chipsOf(card) { return card.querySelectorAll(".tok"); }
  function show(card, i) {  // display token i of card (-1 = the plain image)
    var canvas = card.querySelector("canvas.overlay"), chips = chipsOf(card);
    var label = card.querySelector(".token-label");
    for (var j = 0; j < chips.length; j++) {
      chips[j].classList.toggle("active", j === i);
      chips[j].setAttribute("aria-pressed", j === i ? "true" : "false");
    }
    if (i < 0 || i >= chips.length) {
      delete card.dataset.activeToken;
      canvas.hidden = true; canvas.removeAttribute("data-token");
      label.textContent = chips.length ? "hover, click or focus a token" : "no tokens";
      return;
    }
    var att = attOf(card), row = att.q[i];
    var d = canvas._drawn;
    if (!d || d.token !== row || d.opacity !== opacity) { drawMap(canvas, row); }
    card.dataset.activeToken = String(i);
    canvas.dataset.token = String(i); canvas.hidden = false;
    label.innerHTML = "";
    label.append("token " + (i + 1) + "/" + chips.length + ": ");
    var b = document.createElement("b"); b.textContent = chips[i].textContent;
    label.append(b, "  (max α " + att.p[i] + ")");
    lastCard = card;
  }
  function pin(card, i) { card._pinned = i; show(card, i); }
  function pinned(card) { return card._pinned === undefined ? -1 : card._pinned; }
  function step(card, delta, to) {  // arrows stop at the ends (no wrap)
    var chips = chipsOf(card), n = chips.length;
    if (!n) { return; }
    var cur = pinned(card);
    if (cur < 0) { cur = Array.prototype.indexOf.call(chips, document.activeElement); }
    var j = to !== undefined ? to : (cur < 0 ? (delta > 0 ? 0 : n - 1) : cur + delta);
    j = Math.min(Math.max(j, 0), n - 1);
    pin(card, j); chips[j].focus({preventScroll: false});
  }
  function tokenTarget(ev) {
    var chip = ev.target.closest ? ev.target.closest(".tok") : null;
    return chip ? {chip: chip, card: chip.closest(".item"), i: Number(chip.dataset.i)} : null;
  }

  deck.addEventListener("mouseover", function (ev) {
    var t = tokenTarget(ev); if (t) { show(t.card, t.i); }
  });
  deck.addEventListener("mouseout", function (ev) {
    var t = tokenTarget(ev);
    if (t && !(ev.relatedTarget && t.chip.contains(ev.relatedTarget))) {
      show(t.card, pinned(t.card));
    }
  });
  deck.addEventListener("mousedown", function (ev) {
    var t = tokenTarget(ev); if (t) { t.card._wasPinned = pinned(t.card) === t.i; }
  });
  deck.addEventListener("focusin", function (ev) {
    var t = tokenTarget(ev); if (t) { pin(t.card, t.i); }
  });
  deck.addEventListener("click", function (ev) {
    var t = tokenTarget(ev); if (!t) { return; }
    var again = ev.detail === 0 ? pinned(t.card) === t.i : t.card._wasPinned;
    t.card._wasPinned = false;
    pin(t.card, again ? -1 : t.i);
  });
  document.addEventListener("keydown", function (ev) {
    var t = tokenTarget(ev), loose = ev.target === document.body || ev.target === document;
    var card = t ? t.card : (loose ? lastCard : null);  // keep arrows for select / slider
    if (!card || ev.altKey || ev.ctrlKey || ev.metaKey) { return; }
    var keys = {ArrowRight: 1, ArrowLeft: -1, Home: 0, End: 0, Escape: 0};
    if (!(ev.key in keys)) { return; }
    ev.preventDefault();
    if (ev.key === "Escape") { pin(card, -1); return; }
    if (ev.key === "Home") { step(card, 0, 0); return; }
    if (ev.key === "End") { step(card, 0, chipsOf(card).length - 1); return; }
    step(card, keys[ev.key]);
  });

  function sortCards(value) {
    var cards = Array.prototype.slice.call(deck.querySelectorAll(".item"));
    var cut = value.lastIndexOf(":"), key = value.slice(0, cut), desc = /:desc$/.test(value);
    function val(card) {
      if (!card._sort) { card._sort = JSON.parse(card.dataset.sort); }
      return value === "given" ? Number(card.dataset.index) : card._sort[key];
    }
    cards.sort(function (a, b) {
      var va = val(a), vb = val(b), ma = va === undefined, mb = vb === undefined;
      if (ma || mb) { return ma === mb ? a.dataset.index - b.dataset.index : (ma ? 1 : -1); }
      if (va !== vb) { return desc ? vb - va : va - vb; }
      return a.dataset.index - b.dataset.index;
    });
    cards.forEach(function (card) {
      deck.appendChild(card);
      card.querySelectorAll(".metric").forEach(function (m) {
        m.classList.toggle("sorted", value !== "given" && m.dataset.key === key);
      });
    });
    return cards.map(function (card) { return Number(card.dataset.index); });
  }
  var sortSel = document.getElementById("sort");
  sortSel.addEventListener("change", function () { sortCards(sortSel.value); });

  // Filter by which readers are exact: a spec {"model": 0|1, "others": {name: 0|1}}
  // against each card's data-exact; cards without a verdict for a reader never match.
  function exactOf(card) {
    if (!card._exact) { card._exact = JSON.parse(card.dataset.exact || "{}"); }
    return card._exact;
  }
  function own(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }
  function matches(card, spec) {
    var e = exactOf(card), want = spec.others || {}, have = e.others || {};
    if (own(spec, "model") && e.model !== spec.model) { return false; }
    return Object.keys(want).every(function (name) {
      return own(have, name) && have[name] === want[name];
    });
  }
  var filterSel = document.getElementById("filter");
  var shownLabel = document.getElementById("shown");
  function filterCards(value) {
    var spec = value ? JSON.parse(value) : null, kept = [];
    var cards = deck.querySelectorAll(".item");
    cards.forEach(function (card) {
      var keep = !spec || matches(card, spec);
      card.hidden = !keep;
      if (keep) { kept.push(Number(card.dataset.index)); }
    });
    if (shownLabel) {
      shownLabel.textContent = spec ? kept.length + " of " + cards.length + " shown" : "";
    }
    return kept.sort(function (a, b) { return a - b; });
  }
  if (filterSel) {
    filterSel.addEventListener("change", function () { filterCards(filterSel.value); });
  }
  var slider = document.getElementById("opacity");
  slider.addEventListener("input", function () {
    opacity = Number(slider.value);
    deck.querySelectorAll(".item[data-active-token]").forEach(function (card) {
      show(card, Number(card.dataset.activeToken));
    });
  });

  function state(card) {
    var canvas = card.querySelector("canvas.overlay"), s = {
      active: card.dataset.activeToken === undefined ? null : Number(card.dataset.activeToken),
      overlay: canvas.hidden ? null : Number(canvas.dataset.token),
      label: card.querySelector(".token-label").textContent,
      pressed: card.querySelectorAll('.tok[aria-pressed="true"]').length
    };
    if (canvas.hidden) { return s; }
    var w = canvas.width, h = canvas.height;
    var px = canvas.getContext("2d").getImageData(0, 0, w, h).data;
    var n = 0, levels = {}, best = -1, at = 0;
    for (var k = 3; k < px.length; k += 4) {
      if (px[k]) { n++; }
      levels[px[k]] = 1;
      if (px[k] > best) { best = px[k]; at = (k - 3) / 4; }
    }
    s.alphaPixels = n; s.alphaLevels = Object.keys(levels).length; s.size = [w, h];
    s.peak = [((at % w) + 0.5) / w, (Math.floor(at / w) + 0.5) / h];
    s.sample = [];  // alpha at every STRIDE-th pixel of every STRIDE-th row
    for (var y = 0; y < h; y += STRIDE) {
      for (var x = 0; x < w; x += STRIDE) { s.sample.push(px[(y * w + x) * 4 + 3]); }
    }
    return s;
  }
  function press(el, key) {
    (el || document.body).dispatchEvent(new KeyboardEvent("keydown", {key: key, bubbles: true}));
  }
  function selftest() {
    var out = {items: deck.querySelectorAll(".item").length, sorts: {}};
    var card = deck.querySelector(".item"), chips = card ? chipsOf(card) : [];
    if (chips.length) {
      chips[0].focus(); pin(card, 0);
      out.first = state(card);
      press(chips[0], "ArrowRight");
      out.second = state(card);
      press(chips[1 % chips.length], "End"); press(document.activeElement, "ArrowRight");
      out.end = state(card).active;  // ArrowRight on the last token stops there
      press(document.activeElement, "Escape");
      out.cleared = state(card);
      chips[0].click(); out.clicked = state(card).active;
      chips[0].click(); out.unclicked = state(card).active;
    }
    Array.prototype.forEach.call(sortSel.options, function (opt) {
      out.sorts[opt.value] = sortCards(opt.value);
    });
    sortSel.value = "given"; sortCards("given");
    if (filterSel) {
      out.filters = {};
      Array.prototype.forEach.call(filterSel.options, function (opt) {
        out.filters[opt.textContent] = filterCards(opt.value);
      });
      filterSel.value = ""; filterCards("");
    }
    if (chips.length) { pin(card, Math.min(1, chips.length - 1)); out.final = state(card); }
    var pre = document.getElementById("selftest");
    pre.textContent = JSON.stringify(out);
    document.title = "selftest done";
  }
  if (location.hash === "#selftest") {
    if (document.readyState === "complete") { selftest(); }
    else { window.addEventListener("load", selftest); }
  }
})();

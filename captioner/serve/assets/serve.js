(function () {
  "use strict";
  // Posts picked or dropped images to /v1/caption and shows each result as a report
  // card (the markup of captioner.viz.report); report.js's delegated handlers give the
  // cards their hover, click and arrow-key attention maps. Every text goes in through
  // textContent or an attribute, never as HTML.
  var deck = document.getElementById("cards");
  var status = document.getElementById("status");
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var count = document.querySelector(".bar .count");
  var STAGE_W = 296, STAGE_H = 370, QUANT = 1000, shown = 0;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function stageSize(h, w) {  // = report._stage_size
    var s = Math.min(STAGE_W / w, STAGE_H / h);
    return [Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))];
  }
  function quantise(att) {  // (T, G) -> {q, p}, as report._attention_json
    var q = [], p = [];
    att.forEach(function (row) {
      var clean = row.map(function (v) { return v > 0 ? v : 0; });
      var peak = Math.max.apply(null, clean.concat([0]));
      q.push(clean.map(function (v) { return peak > 0 ? Math.round(v / peak * QUANT) : 0; }));
      p.push(peak > 0 ? Number(peak.toPrecision(4)) : 0);
    });
    return {q: q, p: p};
  }
  function setStatus(text, bad) {
    status.textContent = text;
    status.classList.toggle("error", !!bad);
  }
  function loadImage(url) {
    return new Promise(function (resolve) {
      var img = new Image();
      img.onload = function () { resolve([img.naturalHeight, img.naturalWidth]); };
      img.onerror = function () { resolve([STAGE_H, STAGE_W]); };
      img.src = url;
    });
  }
  function header(index, name) {
    var head = el("header", "card-head");
    head.append(el("span", "idx", "#" + index), el("span", "name", name));
    head.lastChild.title = name;
    return head;
  }
  function card(result, url, hw, index) {
    var item = el("article", "item");
    item.dataset.index = String(index);
    item.dataset.sort = "{}";
    item.append(header(index, result.image));
    var size = stageSize(hw[0], hw[1]);
    var stage = el("div", "stage");
    stage.style.width = size[0] + "px"; stage.style.height = size[1] + "px";
    var img = el("img"); img.src = url; img.alt = result.image;
    img.width = size[0]; img.height = size[1];
    var canvas = el("canvas", "overlay"); canvas.width = size[0]; canvas.height = size[1];
    canvas.hidden = true;
    stage.append(img, canvas);
    item.append(stage);
    if (result.error) {
      item.classList.add("failed");
      item.dataset.att = JSON.stringify({q: [], p: []});
      item.append(el("div", "token-label", "no tokens"),
                  el("div", "problem", result.error.code + ": " + result.error.message));
      return item;
    }
    item.dataset.att = JSON.stringify(quantise(result.attention));
    var label = el("div", "token-label", "hover, click or focus a token");
    label.setAttribute("aria-live", "polite");
    var tokens = el("div", "tokens");
    tokens.setAttribute("role", "group"); tokens.setAttribute("aria-label", "predicted tokens");
    result.tokens.forEach(function (tok, i) {
      var chip = el("button", "tok", tok.trim() ? tok : "\u2423");
      chip.type = "button"; chip.dataset.i = String(i);
      chip.setAttribute("aria-pressed", "false");
      chip.title = "log-prob " + result.token_scores[i];
      tokens.append(chip);
    });
    item.append(label, tokens, el("div", "pred", result.text),
                el("div", "score", "score (sum of log-probs) " + result.score));
    return item;
  }
  function errorOf(body, response) {
    return body && body.error ? body.error.code + ": " + body.error.message
                              : "HTTP " + response.status;
  }
  function send(files) {
    files = Array.prototype.filter.call(files, function () { return true; });
    if (!files.length) { return Promise.resolve(); }
    var form = new FormData();
    files.forEach(function (f) { form.append("image", f, f.name); });
    setStatus("captioning " + files.length + " image(s)\u2026");
    document.body.dataset.state = "busy";
    return fetch("v1/caption", {method: "POST", body: form}).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (body) {
        var results = body && body.results ? body.results : null;
        if (!results) {
          setStatus(errorOf(body, response), true);
          document.body.dataset.state = "error";
          return;
        }
        var urls = files.map(function (f) { return URL.createObjectURL(f); });
        return Promise.all(urls.map(loadImage)).then(function (sizes) {
          results.forEach(function (r, i) {
            deck.prepend(card(r, urls[i], sizes[i], ++shown));
          });
          if (count) { count.textContent = shown + " images"; }
          var bad = results.filter(function (r) { return r.error; }).length;
          setStatus(response.ok ? "done: " + (results.length - bad) + " captioned" +
                    (bad ? ", " + bad + " refused" : "") : errorOf(body, response), !response.ok);
          document.body.dataset.state = response.ok ? "done" : "error";
        });
      });
    }).catch(function (err) {
      setStatus("request failed: " + err, true);
      document.body.dataset.state = "error";
    });
  }
  input.addEventListener("change", function () { send(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach(function (name) {
    document.addEventListener(name, function (ev) {
      ev.preventDefault(); drop.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    document.addEventListener(name, function (ev) {
      ev.preventDefault(); drop.classList.remove("over");
    });
  });
  document.addEventListener("drop", function (ev) {
    if (ev.dataTransfer && ev.dataTransfer.files) { send(ev.dataTransfer.files); }
  });
})();

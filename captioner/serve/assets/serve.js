(function () {
  "use strict";
  // Posts picked or dropped images to /v1/caption and shows each result as a report
  // card (the markup of captioner.viz.report); report.js's delegated handlers give the
  // cards their hover, click and arrow-key attention maps. Every text goes in through
  // textContent or an attribute, never as HTML. A result with a "molecule" (a SMILES
  // model) also shows the server's RDKit drawing beside the picture, as an <img> of an
  // SVG data URL (nothing in it can run), and a "reference SMILES" field that asks
  // /v1/draw for both drawings with the differing atoms and bonds highlighted.
  var deck = document.getElementById("cards");
  var status = document.getElementById("status");
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var count = document.querySelector(".bar .count");
  var STAGE_W = 296, STAGE_H = 370, QUANT = 1000, MOL_PX = 296, shown = 0;

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
  function errorOf(body, response) {
    return body && body.error ? body.error.code + ": " + body.error.message
                              : "HTTP " + response.status;
  }
  function svgImage(svg, alt) {  // the server's RDKit SVG as an image: scripts never run
    var img = el("img", "mol-svg");
    img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svg);
    img.alt = alt; img.width = MOL_PX; img.height = MOL_PX;
    return img;
  }
  function verdict(mol) {  // = report._mark
    if (!mol.prediction.valid) { return ["invalid", "\u2717 not a valid molecule"]; }
    if (mol.exact_match === null) { return ["plain", ""]; }
    return mol.exact_match ? ["exact", "\u2713 exact"] : ["differs", "\u2260 differs"];
  }
  function figure(drawing, cls, who, mark, note) {
    var fig = el("figure", "mol " + cls), cap = el("figcaption");
    if (drawing && drawing.svg) {
      fig.append(svgImage(drawing.svg, who + ": " + (drawing.canonical || drawing.smiles)));
    } else {
      var box = el("div", "nomol", "not a valid molecule");
      box.style.width = MOL_PX + "px"; box.style.height = MOL_PX + "px";
      fig.append(box);
    }
    cap.append(el("b", "who", who), " ");
    if (mark && mark[1]) { cap.append(el("span", "mark " + mark[0], mark[1])); }
    if (note) { cap.append(el("span", "note", note)); }
    fig.append(cap);
    return fig;
  }
  function showMolecules(item, mol) {  // the model's drawing, then the reference's
    var cols = item.querySelector(".cols"), mark = verdict(mol);
    cols.querySelectorAll("figure.mol").forEach(function (f) { f.remove(); });
    var quiet = {"exact match": 1, "not a valid molecule": 1, "no reference": 1};
    cols.append(figure(mol.prediction, "read " + mark[0], "model", mark,
                       quiet[mol.note] ? "" : mol.note));
    if (mol.reference && !mol.exact_match) {
      cols.append(figure(mol.reference, "reference", "reference", null, ""));
    }
  }
  function referenceForm(item, text) {  // type the expected SMILES, see what differs
    var form = el("form", "refform"), input = el("input", "refsmiles");
    var button = el("button", "", "compare"), problem = el("div", "problem");
    input.type = "text"; input.maxLength = 1000; input.spellcheck = false;
    input.autocomplete = "off"; input.placeholder = "reference SMILES (optional)";
    input.setAttribute("aria-label", "reference SMILES");
    button.type = "submit"; problem.hidden = true;
    form.append(input, button);
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var ref = input.value.trim(), payload = {smiles: text};
      if (ref) { payload.reference = ref; }
      item.dataset.draw = "busy";
      fetch("v1/draw", {method: "POST", headers: {"content-type": "application/json"},
                        body: JSON.stringify(payload)}).then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          if (response.ok && body && body.prediction) {
            showMolecules(item, body); problem.hidden = true; item.dataset.draw = "done";
          } else {
            problem.textContent = errorOf(body, response); problem.hidden = false;
            item.dataset.draw = "error";
          }
        });
      }).catch(function (err) {
        problem.textContent = "request failed: " + err; problem.hidden = false;
        item.dataset.draw = "error";
      });
    });
    return [form, problem];
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
    var parts = [label, tokens, el("div", "pred", result.text),
                 el("div", "score", "score (sum of log-probs) " + result.score)];
    if (!result.molecule) {
      parts.forEach(function (p) { item.append(p); });
      return item;
    }
    item.classList.add("smiles", "mols");  // the report's SMILES card layout
    var cols = el("div", "cols"), main = el("div", "col-main");
    main.append(stage);  // moves the picture into the text column
    parts.concat(referenceForm(item, result.text)).forEach(function (p) { main.append(p); });
    cols.append(main);
    item.append(cols);
    showMolecules(item, result.molecule);
    return item;
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
        var urls = files.map(function (f, i) {  // the cut picture the model read, if any
          var view = results[i] && results[i].view;
          return view || URL.createObjectURL(f);
        });
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

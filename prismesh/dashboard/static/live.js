// Live view: the server announces a new key over server-sent events whenever final events,
// stored-object checks or audits change what a page shows; the page then fetches its own
// main section again (rendered and escaped on the server) and swaps it in. No reload.
(function () {
  "use strict";
  var main = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!main || !window.EventSource || !window.fetch) { return; }
  var key = main.getAttribute("data-key");
  var busy = false, again = false;

  function setText(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = String(value); }
  }

  function reload() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { headers: { "X-Fragment": "1" }, cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null) {
          main.innerHTML = html;
          main.setAttribute("data-key", key);
          document.dispatchEvent(new CustomEvent("prismesh:updated", { detail: { key: key } }));
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) { again = false; reload(); }
      });
  }

  var source = new EventSource("/events");
  source.onopen = function () { state.textContent = "live"; state.className = "live on"; };
  source.onerror = function () { state.textContent = "reconnecting"; state.className = "live off"; };
  source.onmessage = function (e) {
    var d;
    try { d = JSON.parse(e.data); } catch (err) { return; }
    setText("hdr-head", d.head);
    setText("hdr-final", d.final);
    setText("hdr-lag", d.lag);
    var indexing = document.getElementById("hdr-indexing");
    if (indexing) {
      indexing.className = d.indexing === null ? "hidden" : "";
      setText("hdr-indexed", d.indexing === null ? "" : d.indexing);
    }
    var banner = document.getElementById("hdr-error");
    if (banner) {
      banner.className = d.error ? "banner" : "banner hidden";
      setText("hdr-error-text", d.error || "");
    }
    if (d.key !== key) { key = d.key; reload(); }
  };
})();

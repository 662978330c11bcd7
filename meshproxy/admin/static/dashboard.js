// meshproxy dashboard: refresh the live sections and run the explain form.
// Hand-written, no build step, no dependencies (served by meshproxy/admin/dashboard.py).
(function () {
  "use strict";
  var every = parseInt(document.body.getAttribute("data-refresh"), 10) || 2000;
  var live = document.getElementById("live");

  function refresh() {
    fetch("/dashboard/live", { cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { live.innerHTML = html; live.removeAttribute("data-stale"); })
      .catch(function () { live.setAttribute("data-stale", "true"); })
      .finally(function () { setTimeout(refresh, every); });
  }
  setTimeout(refresh, every);

  var form = document.getElementById("explain-form");
  var out = document.getElementById("explain-result");

  function explain() {
    var params = new URLSearchParams(new FormData(form));
    out.textContent = "…";
    fetch("/dashboard/explain?" + params.toString(), { cache: "no-store" })
      .then(function (r) { return r.text().then(function (t) { return [r.ok, t]; }); })
      .then(function (res) {
        out.className = res[0] ? "" : "bad";
        out.textContent = res[1];
      })
      .catch(function (e) { out.className = "bad"; out.textContent = String(e); });
  }
  form.addEventListener("submit", function (event) { event.preventDefault(); explain(); });

  // /dashboard/?explain=1&host=...&path=... fills the form and explains at once (links).
  var query = new URLSearchParams(window.location.search);
  if (query.get("explain") === "1") {
    query.forEach(function (value, key) {
      var field = form.elements.namedItem(key);
      if (field) { field.value = value; }
    });
    explain();
  }
})();

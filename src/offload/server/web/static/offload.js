// Offload dashboard: small progressive enhancements; every page works without them.
(function () {
  "use strict";

  // Live session-duration estimate: the server renders the billed time at page load in
  // data-tick-from (seconds); count on from there with the browser's own clock.
  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function clock(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    return Math.floor(s / 3600) + ":" + pad(Math.floor((s % 3600) / 60)) + ":" + pad(s % 60);
  }
  var loaded = Date.now();
  var ticking = document.querySelectorAll("[data-tick-from]");
  function tick() {
    var extra = (Date.now() - loaded) / 1000;
    ticking.forEach(function (el) {
      el.textContent = clock(parseFloat(el.getAttribute("data-tick-from")) + extra);
    });
  }
  if (ticking.length) { tick(); setInterval(tick, 1000); }

  // Ask before destructive forms (remove a member, revoke a token).
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });
})();

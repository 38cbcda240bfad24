// Live refresh for jobhost pages, served as a file because the Content
// Security Policy allows no inline script.
//
// A page marks the part that changes as #live with data-refresh (in
// milliseconds). Every interval this fetches the same URL again and swaps in
// the new #live region. The server escapes every job value, and HTML parsed
// by DOMParser runs no script. A page whose fresh #live has no data-refresh
// (a job that has ended) stops refreshing.
(function () {
  "use strict";

  function start() {
    var live = document.getElementById("live");
    if (!live || !live.dataset.refresh) {
      return;
    }
    var toggle = document.getElementById("live-toggle");
    var interval = Number(live.dataset.refresh) || 2000;

    function schedule() {
      window.setTimeout(refresh, interval);
    }

    function refresh() {
      if (toggle && !toggle.checked) {
        schedule();
        return;
      }
      fetch(window.location.href, { credentials: "same-origin", headers: { "X-Jobhost-Refresh": "1" } })
        .then(function (response) {
          return response.ok ? response.text() : null;
        })
        .then(function (text) {
          if (text === null) {
            schedule();
            return;
          }
          var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
          if (!fresh) {
            schedule();
            return;
          }
          if (fresh.innerHTML !== live.innerHTML) {
            // Keep the rows the user has ticked for a bulk action.
            var ticked = Array.prototype.map.call(live.querySelectorAll("input[type=checkbox]:checked"), function (box) {
              return box.value;
            });
            live.innerHTML = fresh.innerHTML;
            ticked.forEach(function (value) {
              var box = live.querySelector("input[type=checkbox][value=\"" + value + "\"]");
              if (box) {
                box.checked = true;
              }
            });
          }
          if (fresh.dataset.refresh) {
            schedule();
          } else {
            live.removeAttribute("data-refresh");
          }
        })
        .catch(schedule);
    }

    schedule();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();

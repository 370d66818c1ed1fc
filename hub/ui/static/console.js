// The console's one script (CSP: script-src 'self'): confirmations and the live log. Every page works
// without it: a form sent unconfirmed gets the hub's confirmation page, and the log's tail is in the page.
"use strict";

// A form with data-confirm asks first; its "confirmed" field then tells the hub the person was asked.
// "{field}" in the question is that field's value (a select's chosen option, as shown).
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
  const confirmed = form.elements.namedItem("confirmed");
  if (!confirmed || confirmed.value === "yes") return;
  const question = form.dataset.confirm.replace(/\{(\w+)\}/g, (whole, name) => {
    const field = form.elements.namedItem(name);
    if (field instanceof HTMLSelectElement) return field.selectedOptions[0] ? field.selectedOptions[0].text : "";
    return field && "value" in field ? field.value : whole;
  });
  event.preventDefault();
  if (window.confirm(question)) {
    confirmed.value = "yes";
    form.submit();
  }
});

// The newest characters a followed log keeps on the page.
const LIVE_LOG_CHARS = 200000;

function followLog(button) {
  const live = document.getElementById("log-live");
  const state = document.getElementById("follow-state");
  const controller = new AbortController();
  button.textContent = "Stop following";
  state.textContent = "following…";
  const stop = () => controller.abort();
  button.addEventListener("click", stop, { once: true });
  fetch(button.dataset.url, { credentials: "same-origin", signal: controller.signal })
    .then(async (answer) => {
      if (!answer.ok) {
        state.textContent = await answer.text();
        return;
      }
      state.textContent = "following";
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // Text, never markup: a log line holding "<script>" is shown as written.
        live.append(document.createTextNode(value));
        if (live.textContent.length > LIVE_LOG_CHARS) live.textContent = live.textContent.slice(-LIVE_LOG_CHARS / 2);
        live.scrollTop = live.scrollHeight;
      }
      state.textContent = "the log ended";
    })
    .catch((error) => {
      state.textContent = error.name === "AbortError" ? "stopped" : `the log stream broke: ${error.message}`;
    })
    .finally(() => {
      button.removeEventListener("click", stop);
      button.textContent = "Follow live";
      button.addEventListener("click", () => followLog(button), { once: true });
    });
}

const follow = document.getElementById("follow");
if (follow) follow.addEventListener("click", () => followLog(follow), { once: true });

// The log's tail opens at its newest lines.
const tail = document.getElementById("log-tail");
if (tail) tail.scrollTop = tail.scrollHeight;

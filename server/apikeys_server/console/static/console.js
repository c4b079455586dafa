// The console's only script besides htmx (no inline scripts: the page's CSP forbids them).
// Everything works without it; it adds the modal secret dialog, the copy button and the
// confirmations.
"use strict";

function confirmFirst(event) {
  const asking = event.target.closest("[data-confirm]");
  if (asking && !window.confirm(asking.dataset.confirm)) {
    event.preventDefault();
  }
}

function copySecret(button) {
  const field = document.getElementById(button.dataset.copy);
  const status = document.getElementById("copy-status");
  const done = () => { if (status) status.textContent = "Copied to the clipboard."; };
  field.select();
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => {
      if (status) status.textContent = "Select the secret and copy it (Ctrl+C).";
    });
  } else if (document.execCommand("copy")) {
    done();
  }
}

function openSecretDialog() {
  const dialog = document.querySelector("dialog[data-modal]");
  if (!dialog) return;
  const close = dialog.querySelector("a[data-confirm]");
  dialog.close();
  dialog.showModal();
  // Escape would close it without a word: ask first, as the close link does.
  dialog.addEventListener("cancel", (event) => {
    event.preventDefault();
    if (close && window.confirm(close.dataset.confirm)) {
      window.location.assign(close.href);
    }
  });
}

// A POST form is sent once: a double click must not create two keys (and show the
// second one's secret while the first is lost).
function sendOnce(event) {
  const form = event.target;
  if (event.defaultPrevented || form.method.toLowerCase() !== "post") return;
  if (form.dataset.sent) {
    event.preventDefault();
    return;
  }
  form.dataset.sent = "yes";
}

document.addEventListener("submit", confirmFirst);
document.addEventListener("submit", sendOnce);
window.addEventListener("pageshow", (event) => {
  if (event.persisted) {
    document.querySelectorAll("form[data-sent]").forEach((form) => delete form.dataset.sent);
  }
});
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (button) copySecret(button);
  if (event.target.closest("a[data-confirm]")) confirmFirst(event);
});
document.addEventListener("DOMContentLoaded", openSecretDialog);

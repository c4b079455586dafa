// The console's only script besides htmx (no inline scripts: the page's CSP forbids them).
// Everything works without it; it adds the modal secret dialog, the copy button and the
// confirmations.
"use strict";

function confirmFirst(event) {
  const form = event.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) {
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
  const form = dialog.querySelector("form[data-confirm]");
  dialog.close();
  dialog.showModal();
  // Escape would close it without a word: ask first, as the close button does.
  dialog.addEventListener("cancel", (event) => {
    event.preventDefault();
    if (form && window.confirm(form.dataset.confirm)) {
      form.submit();
    }
  });
}

document.addEventListener("submit", confirmFirst);
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (button) copySecret(button);
});
document.addEventListener("DOMContentLoaded", openSecretDialog);

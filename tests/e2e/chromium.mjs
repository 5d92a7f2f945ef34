// Debian's Chromium through playwright-core, with the flags this machine needs (no sandbox as
// root; no background networking, which the closed network refuses). Shared by the page tests.
import { chromium } from "playwright-core";

export function launchChromium(executablePath) {
  return chromium.launch({
    executablePath: executablePath || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}

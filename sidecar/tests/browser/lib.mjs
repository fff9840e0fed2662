// Shared by the browser scripts: Chromium launch, checks, waits with deadlines,
// screenshots and failure reports. See sidecar/tests/browser.rs.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

/** How long any condition may take, as in sidecar/tests/support/mod.rs. */
export const DEADLINE_MS = 30_000;

export function env(name) {
  const value = process.env[name];
  if (value === undefined || value === "") throw new Error(`environment variable ${name} is not set`);
  return value;
}

export function step(message) {
  console.log(`browser: ${message}`);
}

export class CheckFailed extends Error {}

export function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

/** Polls `f` until it returns a truthy value, or fails naming `what` after the
 * deadline. A condition with a deadline, never a fixed sleep. */
export async function eventually(what, f) {
  const start = Date.now();
  let pause = 10;
  let last;
  for (;;) {
    try {
      const value = await f();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() - start > DEADLINE_MS) {
      throw new CheckFailed(`timed out after ${DEADLINE_MS} ms waiting for ${what}` + (last ? ` (last error: ${last.message})` : ""));
    }
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, 100);
  }
}

export const byTestId = (id) => `[data-testid="${id}"]`;

/**
 * Launches Chromium, opens a page and runs `body({page, shot, noProblems})`. Page
 * errors, CSP violations and dialogs are collected; `noProblems()` fails on any.
 * `shot(name)` saves a screenshot of the view when AIRLOCK_SCREENSHOTS is set. On
 * failure: a screenshot `failure.png` in AIRLOCK_ARTIFACTS, the page's URL and
 * console, and exit status 1.
 */
export async function withPage(body) {
  const artifacts = env("AIRLOCK_ARTIFACTS");
  const executablePath = process.env.AIRLOCK_CHROMIUM || "/usr/bin/chromium";
  try {
    check(existsSync(executablePath),
      `no Chromium at ${executablePath}: run \`apt-get install chromium\` (or set CHROMIUM_PATH for sidecar/tests/browser.rs)`);
    step(`launching ${executablePath}`);
    const browser = await chromium.launch({
      executablePath,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
    });
    const problems = [];
    const consoleLines = [];
    let page;
    try {
      const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
      page = await context.newPage();
      page.setDefaultTimeout(DEADLINE_MS);
      page.on("dialog", (dialog) => {
        problems.push(`a ${dialog.type()} dialog opened: ${dialog.message()}`);
        dialog.dismiss().catch(() => {});
      });
      page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
      page.on("console", (msg) => {
        consoleLines.push(`[${msg.type()}] ${msg.text()}`);
        if (/Content Security Policy|Refused to/i.test(msg.text())) problems.push(`CSP violation: ${msg.text()}`);
      });
      // Screenshots of each view only when asked for (they are for people to look
      // at, and slow on a loaded machine); a failed one never fails the test.
      const shot = async (name) => {
        if (!process.env.AIRLOCK_SCREENSHOTS) return;
        const path = join(artifacts, `${name}.png`);
        try {
          await page.screenshot({ path, fullPage: true });
          step(`screenshot ${path}`);
        } catch (e) {
          step(`no screenshot ${path} (${e.message.split("\n")[0]})`);
        }
      };
      const noProblems = () => check(problems.length === 0, `the page misbehaved:\n  ${problems.join("\n  ")}`);
      await body({ page, shot, noProblems });
      noProblems();
    } catch (error) {
      if (page) {
        const path = join(artifacts, "failure.png");
        try {
          await page.screenshot({ path, fullPage: true });
          console.error(`browser: screenshot of the failure: ${path}`);
        } catch (e) {
          console.error(`browser: no screenshot (${e.message})`);
        }
        console.error(`browser: the page was at ${page.url()}`);
      }
      if (problems.length) console.error(`browser: problems seen:\n  ${problems.join("\n  ")}`);
      if (consoleLines.length) console.error(`browser: console:\n  ${consoleLines.join("\n  ")}`);
      throw error;
    } finally {
      await browser.close();
    }
    step("all checks passed");
  } catch (error) {
    console.error(`browser: FAILED: ${error instanceof CheckFailed ? error.message : error.stack || error}`);
    process.exitCode = 1;
  }
}

/** Opens the page at `url`, checks its CSP, and waits for the sign-in form. */
export async function open(page, url) {
  step(`opening ${url}/`);
  const response = await page.goto(`${url}/`);
  check(response && response.ok(), `GET / answered ${response && response.status()}`);
  const csp = response.headers()["content-security-policy"] || "";
  check(/script-src 'self'/.test(csp), `GET / sent no strict Content-Security-Policy (got ${JSON.stringify(csp)})`);
  await page.locator(byTestId("sign-in-form")).waitFor();
  step("the sign-in form is shown");
}

/** Signs in on the sign-in form with `token`; checks the name and role shown. */
export async function signIn(page, token, expect) {
  await page.locator(byTestId("token")).fill(token);
  await page.locator(byTestId("sign-in")).click();
  await page.locator(byTestId("whoami-name")).waitFor();
  const who = await page.locator(byTestId("whoami-name")).textContent();
  const role = await page.locator(byTestId("whoami-role")).textContent();
  check(who === expect.name, `signed in as ${JSON.stringify(who)}, expected ${JSON.stringify(expect.name)}`);
  check(role === expect.role, `the role shown is ${JSON.stringify(role)}, expected ${JSON.stringify(expect.role)}`);
  step(`signed in as ${who} (${role})`);
}

/** Signs out with the header's button and waits for the sign-in form. */
export async function signOut(page) {
  await page.locator(byTestId("sign-out")).click();
  await page.locator(byTestId("sign-in-form")).waitFor();
  step("signed out");
}

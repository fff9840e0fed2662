// Roles in the review page, driven through Debian's Chromium: a viewer reads but is
// offered no decision and no undo; an admin sees the API's refusal of a second vote
// (409), undoes a run, first meeting a conflict, then forcing, and rejects the intent.
// A viewer whose event stream fails sees changes by polling. The page must stay
// usable on a narrow screen. Started by sidecar/tests/browser.rs.
//
// Environment (all required unless noted):
//   AIRLOCK_URL            the review endpoint
//   AIRLOCK_VIEWER         a viewer's name, AIRLOCK_VIEWER_TOKEN its token
//   AIRLOCK_ADMIN          an admin's name, AIRLOCK_ADMIN_TOKEN its token
//   AIRLOCK_PENDING        an intent awaiting review (needs 2 approvals) that the
//                          admin has approved once already
//   AIRLOCK_UNDO_RUN       a run whose applied intents are AIRLOCK_UNDO_INTENTS
//                          (JSON array), one of whose rows changed since
//   AIRLOCK_ARTIFACTS      a directory for screenshots
//   AIRLOCK_SCREENSHOTS    optional; when set, a screenshot of each view too
//   AIRLOCK_CHROMIUM       optional; default /usr/bin/chromium

import { DEADLINE_MS, byTestId, check, env, eventually, open, signIn, signOut, step, withPage } from "./lib.mjs";

const url = env("AIRLOCK_URL").replace(/\/$/, "");
const viewer = env("AIRLOCK_VIEWER");
const viewerToken = env("AIRLOCK_VIEWER_TOKEN");
const admin = env("AIRLOCK_ADMIN");
const adminToken = env("AIRLOCK_ADMIN_TOKEN");
const pending = env("AIRLOCK_PENDING");
const undoRun = env("AIRLOCK_UNDO_RUN");
const undoIntents = JSON.parse(env("AIRLOCK_UNDO_INTENTS"));

await withPage(async ({ page, shot, noProblems }) => {
  const row = page.locator(`${byTestId("intent-row")}[data-id="${pending}"]`);

  // --- a viewer -----------------------------------------------------------------
  await open(page, url);
  await signIn(page, viewerToken, { name: viewer, role: "viewer" });
  await row.waitFor();
  const progress = await row.locator(byTestId("review-progress")).textContent();
  check(/1 of 2/.test(progress), `review progress shows ${JSON.stringify(progress)}, expected 1 of 2`);
  await row.locator(byTestId("intent-link")).click();
  await page.locator(byTestId("viewer-note")).waitFor();
  check(await page.locator(`${byTestId("approve")}, ${byTestId("reject")}, ${byTestId("review-comment")}`).count() === 0,
    "a viewer is offered approve or reject");
  await shot("11-viewer-intent");
  await page.locator(byTestId("nav-runs")).click();
  await page.locator(`${byTestId("run-row")}[data-run="${undoRun}"] ${byTestId("run-link")}`).click();
  await page.locator(byTestId("run-history")).waitFor();
  check(await page.locator(byTestId("undo-panel")).count() === 0, "a viewer is offered undo");
  noProblems();
  step("a viewer reads the intent and the run, with no decision or undo offered");
  await signOut(page);

  // --- a second viewer whose server-sent events fail: the page polls instead ------
  const watchContext = await page.context().browser().newContext({ viewport: { width: 1366, height: 900 } });
  const watch = await watchContext.newPage();
  watch.setDefaultTimeout(DEADLINE_MS);
  const watchErrors = [];
  watch.on("pageerror", (e) => watchErrors.push(e.message));
  watch.on("dialog", (d) => watchErrors.push(`a ${d.type()} dialog opened`));
  let watchLoads = 0;
  watch.on("load", () => {
    watchLoads += 1;
  });
  await watch.route("**/v1/events", (route) => route.abort());
  await open(watch, url);
  await signIn(watch, viewerToken, { name: viewer, role: "viewer" });
  await watch.locator(byTestId("nav-runs")).click();
  await watch.locator(`${byTestId("run-row")}[data-run="${undoRun}"] ${byTestId("run-link")}`).click();
  await watch.locator(byTestId("run-history")).waitFor();
  await eventually("the second viewer's page to fall back to polling", async () =>
    (await watch.locator(byTestId("live-status")).getAttribute("data-mode")) === "poll");
  const watchLoadsBefore = watchLoads;
  step(`a second viewer without server-sent events watches run ${undoRun}: ${await watch.locator(byTestId("live-status")).textContent()}`);

  // --- an admin: a second vote is refused, and the page says why ----------------
  await signIn(page, adminToken, { name: admin, role: "admin" });
  // Signing in keeps the view the address names (the viewer's last: the run).
  await page.locator(byTestId("run-history")).waitFor();
  await page.locator(byTestId("nav-pending")).click();
  await row.locator(byTestId("intent-link")).click();
  await page.locator(byTestId("decide-panel")).waitFor();
  await page.locator(byTestId("own-vote")).waitFor();
  await page.locator(byTestId("reject")).click();
  const error = page.locator(byTestId("review-error"));
  await error.waitFor();
  check(/needs a comment/.test(await error.textContent()), `rejecting without a comment says ${JSON.stringify(await error.textContent())}`);
  step("a rejection without a comment is stopped in the page");
  await page.locator(byTestId("review-comment")).fill("Second look.");
  await page.locator(byTestId("approve")).click();
  await eventually("the API's refusal of a second vote to be shown", async () =>
    /already/.test((await error.textContent()) || ""));
  const refusal = await error.textContent();
  check(!/409 Conflict$/.test(refusal), `the page shows a generic error, not the API's message: ${JSON.stringify(refusal)}`);
  await eventually("the buttons to be usable again", () => page.locator(byTestId("approve")).isEnabled());
  check(await page.locator(byTestId("review-comment")).inputValue() === "Second look.", "the comment was lost");
  noProblems();
  step(`a second vote by the same reviewer is refused, and the page says: ${refusal}`);
  await shot("12-admin-refused");

  // --- an admin undoes a run: a conflict first, then forced ---------------------
  await page.locator(byTestId("nav-runs")).click();
  await page.locator(`${byTestId("run-row")}[data-run="${undoRun}"] ${byTestId("run-link")}`).click();
  const panel = page.locator(byTestId("undo-panel"));
  await panel.waitFor();
  const result = panel.locator(byTestId("undo-result"));
  await panel.locator(byTestId("undo")).click();
  await panel.locator(byTestId("undo-confirm-box")).waitFor();
  step("undo asks for confirmation");
  await shot("13-undo-confirm");
  await panel.locator(byTestId("undo-confirm")).click();
  await eventually("the undo outcome", async () => (await result.getAttribute("data-outcome")) === "conflicts");
  const conflicts = await panel.locator(byTestId("undo-conflicts")).textContent();
  check(conflicts.includes("customers"), `the conflicts shown do not name the table: ${JSON.stringify(conflicts)}`);
  step("undo without force reports the conflict");
  await shot("14-undo-conflicts");
  await panel.locator(byTestId("undo")).click();
  await panel.locator(byTestId("undo-force")).check();
  await panel.locator(byTestId("undo-confirm")).click();
  await eventually("the forced undo's outcome", async () => (await result.getAttribute("data-outcome")) === "undone");
  const reverted = await panel.locator(byTestId("undo-reverted")).textContent();
  for (const id of undoIntents) check(reverted.includes(id), `intent ${id} is not listed as reverted: ${JSON.stringify(reverted)}`);
  check((await panel.locator(byTestId("undo-forced")).textContent()).includes("customers"), "the forced conflicts are not shown");
  for (const id of undoIntents) {
    await page.locator(`${byTestId("run-intent-row")}[data-id="${id}"][data-state="undone"]`).waitFor();
  }
  noProblems();
  step(`forced undo reverted ${undoIntents.join(", ")}; the run shows them undone`);
  await shot("15-undo-forced");
  for (const id of undoIntents) {
    await watch.locator(`${byTestId("run-intent-row")}[data-id="${id}"][data-state="undone"]`).waitFor();
  }
  check(watchLoads === watchLoadsBefore, "the polling viewer's page reloaded");
  check(watchErrors.length === 0, `the polling viewer's page misbehaved: ${watchErrors.join("; ")}`);
  step("the polling viewer's page shows the undo too, without a reload");
  await watchContext.close();

  // --- a narrow screen ------------------------------------------------------------
  await page.setViewportSize({ width: 400, height: 860 });
  await page.locator(byTestId("nav-pending")).click();
  await row.waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `the pending list is ${overflow} px wider than a 400 px screen`);
  await shot("16-narrow-pending");
  await row.locator(byTestId("intent-link")).click();
  await page.locator(byTestId("decide-panel")).waitFor();
  const overflowIntent = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflowIntent <= 0, `the intent view is ${overflowIntent} px wider than a 400 px screen`);
  await shot("17-narrow-intent");
  step("the pending list and the intent view fit a 400 px screen");

  // --- the admin changes their mind: a rejection, with its reason ----------------
  await page.setViewportSize({ width: 1366, height: 900 });
  await page.locator(byTestId("review-comment")).fill("Lin is still a customer.");
  await page.locator(byTestId("reject")).click();
  const flash = page.locator(byTestId("flash"));
  await flash.waitFor();
  check(/You rejected/.test(await flash.textContent()), `after rejecting, the page says ${JSON.stringify(await flash.textContent())}`);
  await eventually("the intent view to show the intent rejected", async () =>
    (await page.locator(`h1 ${byTestId("state")}`).getAttribute("data-state")) === "rejected");
  check(await page.locator(byTestId("decide-panel")).count() === 0, "the decision panel is still shown after the rejection");
  step("the admin rejects the intent with a reason; the page shows it rejected");
  await shot("18-rejected");
});

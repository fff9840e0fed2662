// Drives Debian's Chromium through the review page of a running Airlock, as an
// approver would: sign in, find the pending intent, check that the agent's hostile
// text is shown as text, read the diff, see a new intent arrive without a reload,
// approve. Started by sidecar/tests/browser.rs, which sets up the sandbox and checks
// the outcome on disk afterwards.
//
// Environment (all required unless noted):
//   AIRLOCK_URL              the review endpoint, e.g. http://127.0.0.1:41234
//   AIRLOCK_TOKEN            an approver's token
//   AIRLOCK_REVIEWER         that token's name
//   AIRLOCK_INTENT           the id of an intent awaiting review (a delete)
//   AIRLOCK_RUN              its run
//   AIRLOCK_REASON           its reason, exactly
//   AIRLOCK_EXPECT_BEFORE    JSON object: the row it deletes, column -> value
//   AIRLOCK_INTENTS_DIR      the intent directory
//   AIRLOCK_SECOND_INTENT    JSON of a second intent that needs review, written
//                            into the intent directory while the page is open
//   AIRLOCK_COMMENT          the approval's comment
//   AIRLOCK_ARTIFACTS        a directory for screenshots (one per view, and
//                            failure.png when something fails)
//   AIRLOCK_SCREENSHOTS    optional; when set, a screenshot of each view too
//   AIRLOCK_CHROMIUM         optional; default /usr/bin/chromium
//
// Exits 0 when every check passed, 1 with a message otherwise.

import { writeFileSync, renameSync } from "node:fs";
import { join } from "node:path";
import { byTestId, check, env, eventually, open, signIn, step, withPage } from "./lib.mjs";

const url = env("AIRLOCK_URL").replace(/\/$/, "");
const token = env("AIRLOCK_TOKEN");
const reviewer = env("AIRLOCK_REVIEWER");
const intentId = env("AIRLOCK_INTENT");
const run = env("AIRLOCK_RUN");
const reason = env("AIRLOCK_REASON");
const expectBefore = JSON.parse(env("AIRLOCK_EXPECT_BEFORE"));
const intentsDir = env("AIRLOCK_INTENTS_DIR");
const second = JSON.parse(env("AIRLOCK_SECOND_INTENT"));
const comment = env("AIRLOCK_COMMENT");

await withPage(async ({ page, shot, noProblems }) => {
  let loads = 0;
  page.on("load", () => {
    loads += 1;
  });

  // --- sign in --------------------------------------------------------------
  await open(page, url);
  await shot("01-sign-in");
  await signIn(page, token, { name: reviewer, role: "approver" });

  // --- the pending list -----------------------------------------------------
  const row = page.locator(`${byTestId("intent-row")}[data-id="${intentId}"]`);
  await row.waitFor();
  step(`intent ${intentId} is listed as pending`);
  const listedReason = await row.locator(byTestId("intent-reason")).textContent();
  check(listedReason === reason, `the list shows the reason as ${JSON.stringify(listedReason)}, expected the literal ${JSON.stringify(reason)}`);
  const progress = await row.locator(byTestId("review-progress")).textContent();
  check(/0 of 1/.test(progress), `review progress shows ${JSON.stringify(progress)}, expected 0 of 1`);
  const injected = await page.locator("main img, main script, main svg, main iframe").count();
  check(injected === 0, `the agent's text injected ${injected} element(s) into the page`);
  noProblems();
  step("the hostile reason is shown as literal text; no element injected, no dialog");
  await shot("02-pending");

  // --- the intent -------------------------------------------------------------
  await row.locator(byTestId("intent-link")).click();
  await page.waitForURL((u) => u.hash === `#/intent/${encodeURIComponent(intentId)}`);
  await page.locator(byTestId("diff-op")).first().waitFor();
  const detailReason = await page.locator(`${byTestId("main")} p${byTestId("intent-reason")}`).textContent();
  check(detailReason === reason, `the intent view shows the reason as ${JSON.stringify(detailReason)}`);
  const tables = page.locator(byTestId("diff-table"));
  check(await tables.count() === 1, `expected one row in the diff, found ${await tables.count()}`);
  check(await tables.first().getAttribute("data-status") === "deleted",
    `the diff's row is ${await tables.first().getAttribute("data-status")}, expected deleted`);
  for (const [column, value] of Object.entries(expectBefore)) {
    const cellRow = tables.first().locator(`${byTestId("diff-row")}[data-column="${column}"]`);
    const before = await cellRow.locator(byTestId("diff-before")).textContent();
    const after = await cellRow.locator(byTestId("diff-after")).textContent();
    const shown = value === null ? "NULL" : typeof value === "string" ? value : JSON.stringify(value);
    check(before === shown, `column ${column} before: ${JSON.stringify(before)}, expected ${JSON.stringify(shown)}`);
    check(after === "deleted", `column ${column} after: ${JSON.stringify(after)}, expected "deleted"`);
    check(await cellRow.getAttribute("data-change") === "removed", `column ${column} is not marked removed`);
  }
  await page.locator(byTestId("diff-legend")).waitFor();
  const payload = await page.locator(byTestId("payload")).textContent();
  check(JSON.parse(payload).id === intentId, "the payload <pre> does not hold the intent's JSON");
  const injectedHere = await page.locator("main img, main script, main svg, main iframe").count();
  check(injectedHere === 0, `the agent's text injected ${injectedHere} element(s) into the intent view`);
  check(await page.locator(byTestId("approve")).isVisible(), "an approver sees no approve button");
  check(await page.locator(byTestId("reject")).isVisible(), "an approver sees no reject button");
  noProblems();
  step("the intent view shows the row's before values and the delete");
  check(await page.locator(byTestId("payload")).isVisible(), "the payload is folded away");
  await shot("03-intent");

  // --- a new intent arrives while the page is open ----------------------------
  await page.locator(byTestId("nav-pending")).click();
  await row.waitFor();
  const loadsBefore = loads;
  await page.evaluate(() => {
    window.airlockNoReload = true;
  });
  const name = `${second.id}.json`;
  const tmp = join(intentsDir, `.${name}.tmp`);
  writeFileSync(tmp, JSON.stringify(second, null, 2));
  renameSync(tmp, join(intentsDir, name));
  step(`wrote ${name} into the intent directory; waiting for it to appear without a reload`);
  await page.locator(`${byTestId("intent-row")}[data-id="${second.id}"]`).waitFor();
  check(loads === loadsBefore && await page.evaluate(() => window.airlockNoReload === true),
    "the page reloaded to show the new intent");
  const live = await page.locator(byTestId("live-status")).getAttribute("data-mode");
  step(`intent ${second.id} appeared without a reload (updates: ${live === "ok" ? "server-sent events" : "polling"})`);
  await shot("04-pending-live");

  // --- approve ----------------------------------------------------------------
  await row.locator(byTestId("intent-link")).click();
  await page.locator(byTestId("decide-panel")).waitFor();
  await page.locator(byTestId("review-comment")).fill(comment);
  await page.locator(byTestId("approve")).click();
  const flash = page.locator(byTestId("flash"));
  await flash.waitFor();
  const flashText = await flash.textContent();
  check(/You approved/.test(flashText), `after approving, the page says ${JSON.stringify(flashText)}`);
  step(`approved: ${flashText}`);
  const badge = page.locator(`h1 ${byTestId("state")}`);
  await eventually("the intent view to show the intent applied", async () =>
    (await badge.getAttribute("data-state")) === "applied");
  check(await page.locator(byTestId("decide-panel")).count() === 0, "the decision panel is still shown after the decision");
  const vote = page.locator(`${byTestId("vote")}[data-reviewer="${reviewer}"]`);
  await vote.waitFor();
  check((await vote.textContent()).includes(comment), "the vote does not show the comment");
  noProblems();
  step("the intent view shows it applied, with the vote and its comment");
  await shot("05-intent-applied");

  // --- the runs -----------------------------------------------------------------
  await page.locator(byTestId("nav-runs")).click();
  const runRow = page.locator(`${byTestId("run-row")}[data-run="${run}"]`);
  await runRow.waitFor();
  await shot("06-runs");
  await runRow.locator(byTestId("run-link")).click();
  await page.locator(byTestId("run-history")).waitFor();
  const approved = page.locator(`${byTestId("run-history")} ${byTestId("history-record")}[data-event="approved"]`);
  await approved.waitFor();
  check((await approved.textContent()).includes(reviewer), "the run's history does not name the approver");
  check(await page.locator(byTestId("undo")).count() === 0, "an approver (not an admin) is offered undo");
  noProblems();
  step(`run ${run} shows the approval by ${reviewer}; no undo for an approver`);
  await shot("07-run");

  // --- sign out -------------------------------------------------------------------
  await page.locator(byTestId("sign-out")).click();
  await page.locator(byTestId("sign-in-form")).waitFor();
  await page.reload();
  await page.locator(byTestId("sign-in-form")).waitFor();
  noProblems();
  step("signed out: the sign-in form is back, also after a reload");
});

//! Review: human approvers decide intents the policy sent to review.
//!
//! Every way of deciding (the CLI, the HTTP endpoint, the demo) goes through these
//! functions, so the rules are the same for each (the HTTP API also checks comments
//! and a rejection's reason up front, to answer 400). This module checks what comes
//! with a review (a reviewer name of 1 to 256 characters, comments of at most
//! [`MAX_COMMENT`] characters, a rejection's reason, the preview seen against a fresh
//! one); the queue's writer ([`crate::queue::Writer::approve`] and
//! [`crate::queue::Writer::reject`]) checks the rest inside the transaction that
//! records the review: the intent awaits review and its deadline has not passed, a
//! digest the review names is the intent's current one, approvals come from distinct
//! reviewers and the intent is approved when `approvals` of them agree; one
//! rejection rejects.
//!
//! An approval also binds the rows the reviewer saw: the digest of the preview
//! shown ([`crate::apply::Preview::digest`]). Front ends compute a fresh preview
//! ([`show`]) and [`approve`] refuses an approval whose preview digest is not the
//! fresh one (the rows changed since the reviewer looked). Approvals count together
//! only when they saw the same rows, and the apply checks the rows again inside its
//! transaction: if they changed since, the intent goes back to review (see
//! [`crate::pipeline`]).

use crate::apply::{ApplyError, ApplyMeta, Preview, Target, failed_preview_digest};
use crate::lifecycle::State;
use crate::queue::{IntentRow, Queue, QueueError, ReviewProgress};

/// Longest comment (or rejection reason) recorded, in characters.
pub const MAX_COMMENT: usize = 4_000;

/// What a reviewer is shown of an intent's effect on its target now.
#[derive(Clone, Debug)]
pub struct Shown {
    /// The rolled-back preview, or why the intent would fail now.
    pub preview: Result<Preview, ApplyError>,
    /// What an approval of it binds: the rows' [`Preview::digest`], or for an
    /// intent that would fail, [`failed_preview_digest`] (if it would apply later
    /// after all, it goes back to review).
    pub digest: String,
}

/// Previews intent `row` on `target` as a reviewer is shown it. A transient error
/// (the target is busy or unreachable) is an error: nothing can be shown, so
/// nothing can be approved.
pub async fn show(
    target: &dyn Target,
    row: &IntentRow,
    max_rows: u64,
) -> Result<Shown, ApplyError> {
    let intent = row
        .intent()
        .map_err(|e| ApplyError::permanent(e.to_string()))?;
    let meta = ApplyMeta {
        digest: row.digest.clone(),
        max_rows,
        reviewed: None,
    };
    match target.preview(&intent, &meta).await {
        Ok(preview) => Ok(Shown {
            digest: preview.digest(),
            preview: Ok(preview),
        }),
        Err(error) if error.is_transient() => Err(error),
        Err(error) => Ok(Shown {
            digest: failed_preview_digest(&error),
            preview: Err(error),
        }),
    }
}

/// Records `reviewer`'s approval of intent `id`, having seen the preview whose
/// digest is `seen`; `now` is the digest of a preview computed just before (see
/// [`show`]). Refused when they differ: the rows changed since the reviewer looked.
#[allow(clippy::too_many_arguments)]
pub fn approve(
    queue: &mut Queue,
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    seen: &str,
    now: &str,
    comment: Option<&str>,
) -> Result<ReviewProgress, QueueError> {
    check_reviewer(reviewer)?;
    check_comment(comment.unwrap_or(""))?;
    if seen != now {
        return Err(QueueError::Refused(format!(
            "the rows intent {id} touches changed since the preview you approved ({seen}); \
             they now preview as {now}: look at the preview again before approving"
        )));
    }
    queue.write(|w| w.approve(id, reviewer, digest, seen, comment))
}

/// Records `reviewer`'s rejection of intent `id`, with the reason the agent will see.
pub fn reject(
    queue: &mut Queue,
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    reason: &str,
) -> Result<State, QueueError> {
    check_reviewer(reviewer)?;
    if reason.trim().is_empty() {
        return Err(QueueError::Refused("a rejection needs a reason".into()));
    }
    check_comment(reason)?;
    queue.write(|w| w.reject(id, reviewer, digest, reason))
}

fn check_reviewer(reviewer: &str) -> Result<(), QueueError> {
    if reviewer.trim().is_empty() || reviewer.len() > 256 {
        return Err(QueueError::Refused(
            "a reviewer name must be 1 to 256 characters".into(),
        ));
    }
    Ok(())
}

fn check_comment(comment: &str) -> Result<(), QueueError> {
    if comment.chars().count() > MAX_COMMENT {
        return Err(QueueError::Refused(format!(
            "a comment may be at most {MAX_COMMENT} characters"
        )));
    }
    Ok(())
}

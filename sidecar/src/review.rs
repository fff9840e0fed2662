//! Review: human approvers decide intents the policy sent to review.
//!
//! Every way of deciding (the CLI today, the HTTP endpoint later) goes through these
//! functions, so the rules live in one place: an approval names the reviewer and may
//! name the digest it approves (a digest that is not the intent's current one is
//! refused); `approvals` distinct reviewers are needed; one rejection rejects.

use crate::lifecycle::State;
use crate::queue::{Queue, QueueError, ReviewProgress};

/// Longest comment (or rejection reason) recorded, in characters.
pub const MAX_COMMENT: usize = 4_000;

/// Records `reviewer`'s approval of intent `id`.
pub fn approve(
    queue: &mut Queue,
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    comment: Option<&str>,
) -> Result<ReviewProgress, QueueError> {
    check_reviewer(reviewer)?;
    check_comment(comment.unwrap_or(""))?;
    queue.write(|w| w.approve(id, reviewer, digest, comment))
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

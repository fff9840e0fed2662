//! Review: the rules by which human approvers decide intents the policy sent to review.
//!
//! Every way of deciding (the CLI and the HTTP endpoint) goes through [`approve`] and
//! [`reject`], and the rules are pure functions over what the queue stores about an
//! intent (its state, digest, review deadline, approvals needed, and the votes so
//! far), so they live in one place and the queue only persists what they decide:
//!
//! - **Open** ([`check_open`]): only an intent awaiting review takes a vote, and only
//!   before its deadline (a review that outlived it never passes, even before the
//!   pipeline expires it).
//! - **Digest binding**: a vote may name the digest it decides; a digest that is not
//!   the intent's is refused (the reviewer saw other bytes).
//! - **Preview binding**: an approval also binds the rows the reviewer saw, the
//!   digest of the preview shown ([`crate::apply::Preview::digest`]). Front ends
//!   compute a fresh preview ([`show`]) and an approval whose preview is not the fresh
//!   one is refused (the rows changed since the reviewer looked). Approvals count
//!   together only when they saw the same rows: an approval of other rows is void,
//!   and the apply checks the rows again inside its transaction (if they changed
//!   since, the intent goes back to review; see [`crate::pipeline`]).
//! - **Distinct reviewers and quorum** ([`tally`]): `approvals` distinct reviewers
//!   are needed; one rejection rejects.
//!
//! A refusal is a [`ReviewError`], which says what was refused and why; front ends
//! map it to their own answer (the HTTP status in one place, `http::api`).

use crate::apply::{ApplyError, ApplyMeta, Preview, Target, failed_preview_digest};
use crate::lifecycle::State;
use crate::queue::{Approval, IntentRow, Queue, QueueError, ReviewProgress, ReviewVote};

/// Longest comment (or rejection reason) recorded, in characters.
pub const MAX_COMMENT: usize = 4_000;

/// Longest reviewer name recorded, in bytes.
pub const MAX_REVIEWER: usize = 256;

/// Why a vote was refused (or could not be recorded).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The reviewer's name is empty or too long.
    #[error("a reviewer name must be 1 to {MAX_REVIEWER} characters")]
    Reviewer,
    /// The comment (or rejection reason) is longer than [`MAX_COMMENT`].
    #[error("a comment (or a rejection's reason) may be at most {MAX_COMMENT} characters")]
    CommentTooLong,
    /// A rejection without a reason: the agent would not learn why.
    #[error("a rejection needs a reason (a comment that is not blank); the agent is told it")]
    NoReason,
    /// The intent is not awaiting review.
    #[error("intent {id} is {state}, not awaiting review")]
    NotAwaitingReview { id: String, state: State },
    /// The review outlived its deadline (ms since the epoch).
    #[error("the review of intent {id} expired at {}", crate::clock::timestamp(*deadline))]
    Expired { id: String, deadline: i64 },
    /// The vote names a digest that is not the intent's.
    #[error(
        "intent {id} has digest {digest}, not {named}: the review names other bytes than the intent holds"
    )]
    OtherBytes {
        id: String,
        digest: String,
        named: String,
    },
    /// The rows changed since the reviewer saw them.
    #[error(
        "the rows intent {id} touches changed since the preview you approved ({seen}); \
         they now preview as {now}: look at the preview again before approving"
    )]
    RowsChanged {
        id: String,
        seen: String,
        now: String,
    },
    /// The reviewer already has a vote that counts on this intent.
    #[error(
        "{reviewer} has already reviewed intent {id}; approvals must come from distinct reviewers"
    )]
    AlreadyReviewed { id: String, reviewer: String },
    /// The queue could not read or record the vote (or has no such intent).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What one more approval does to an intent's review, as [`tally`] decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Reviewers whose approvals are void: they saw other rows than this approval
    /// (in the order they voted). They may approve again.
    pub voided: Vec<String>,
    /// Approvals that count with this one.
    pub approvals: u32,
    /// Approvals the decision needs (at least 1).
    pub needed: u32,
    /// Whether `approvals` reaches `needed`: the intent is approved.
    pub quorum_met: bool,
}

/// Checks the parts of a vote that do not depend on the intent: the reviewer's name
/// and the comment (or reason) to be recorded.
pub fn check_vote(reviewer: &str, comment: Option<&str>) -> Result<(), ReviewError> {
    if reviewer.trim().is_empty() || reviewer.len() > MAX_REVIEWER {
        return Err(ReviewError::Reviewer);
    }
    if comment.is_some_and(|c| c.chars().count() > MAX_COMMENT) {
        return Err(ReviewError::CommentTooLong);
    }
    Ok(())
}

/// Checks that intent `row` takes a vote at `now` (ms since the epoch): it awaits
/// review, its deadline has not passed, and `digest`, when the vote names one, is
/// the intent's. Front ends may call it before showing a preview; [`approve`] and
/// [`reject`] call it again in the transaction that records the vote.
pub fn check_open(row: &IntentRow, digest: Option<&str>, now: i64) -> Result<(), ReviewError> {
    if row.state != State::AwaitingReview {
        return Err(ReviewError::NotAwaitingReview {
            id: row.id.clone(),
            state: row.state,
        });
    }
    if let Some(deadline) = row.review_deadline
        && deadline <= now
    {
        return Err(ReviewError::Expired {
            id: row.id.clone(),
            deadline,
        });
    }
    if let Some(named) = digest
        && named != row.digest
    {
        return Err(ReviewError::OtherBytes {
            id: row.id.clone(),
            digest: row.digest.clone(),
            named: named.to_owned(),
        });
    }
    Ok(())
}

/// Whether `vote` counts toward the quorum of an intent with digest `digest`: an
/// approval of exactly its bytes.
pub fn counts(vote: &ReviewVote, digest: &str) -> bool {
    vote.verdict == "approve" && vote.digest == digest
}

/// How many of `votes` count toward the quorum of an intent with digest `digest`.
pub fn approvals(votes: &[ReviewVote], digest: &str) -> u32 {
    let count = votes.iter().filter(|v| counts(v, digest)).count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// Decides what `reviewer`'s approval of intent `row`, having seen the preview with
/// digest `preview`, does given the `votes` recorded so far: approvals of another
/// preview are void; a reviewer whose vote still stands is refused (approvals come
/// from distinct reviewers); the quorum is `row.approvals_needed` (at least 1).
pub fn tally(
    row: &IntentRow,
    votes: &[ReviewVote],
    reviewer: &str,
    preview: &str,
) -> Result<Tally, ReviewError> {
    let (void, standing): (Vec<&ReviewVote>, Vec<&ReviewVote>) = votes
        .iter()
        .partition(|v| v.verdict == "approve" && v.preview.as_deref() != Some(preview));
    if standing.iter().any(|v| v.reviewer == reviewer) {
        return Err(ReviewError::AlreadyReviewed {
            id: row.id.clone(),
            reviewer: reviewer.to_owned(),
        });
    }
    let counted = standing.iter().filter(|v| counts(v, &row.digest)).count();
    // This approval is of the intent's own bytes, so it counts too.
    let approvals = u32::try_from(counted + 1).unwrap_or(u32::MAX);
    let needed = row.approvals_needed.max(1);
    Ok(Tally {
        voided: void.into_iter().map(|v| v.reviewer.clone()).collect(),
        approvals,
        needed,
        quorum_met: approvals >= needed,
    })
}

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
        replay: None,
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
/// `digest`, when given, must be the intent's (see [`check_open`]).
pub fn approve(
    queue: &mut Queue,
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    seen: &str,
    now: &str,
    comment: Option<&str>,
) -> Result<ReviewProgress, ReviewError> {
    check_vote(reviewer, comment)?;
    if seen != now {
        return Err(ReviewError::RowsChanged {
            id: id.to_owned(),
            seen: seen.to_owned(),
            now: now.to_owned(),
        });
    }
    queue.write_with(|w| {
        let row = w.intent(id)?;
        check_open(&row, digest, w.now())?;
        let votes = w.reviews(id)?;
        let tally = tally(&row, &votes, reviewer, seen)?;
        let approval = Approval {
            reviewer,
            preview: seen,
            comment,
            voided: &tally.voided,
            approvals: tally.approvals,
            needed: tally.needed,
            quorum_met: tally.quorum_met,
        };
        Ok(w.record_approval(&row, &approval)?)
    })
}

/// Records `reviewer`'s rejection of intent `id`, with the reason the agent will
/// see; one rejection rejects. `digest`, when given, must be the intent's.
pub fn reject(
    queue: &mut Queue,
    id: &str,
    reviewer: &str,
    digest: Option<&str>,
    reason: &str,
) -> Result<State, ReviewError> {
    check_vote(reviewer, None)?;
    if reason.trim().is_empty() {
        return Err(ReviewError::NoReason);
    }
    check_vote(reviewer, Some(reason))?;
    queue.write_with(|w| {
        let row = w.intent(id)?;
        check_open(&row, digest, w.now())?;
        Ok(w.record_rejection(&row, reviewer, reason)?)
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::queue::{Arrival, DecisionOutcome};
    use crate::seal;

    const DIGEST: &str = "sha256:aa";

    fn row(state: State, needed: u32, deadline: Option<i64>) -> IntentRow {
        IntentRow {
            seq: 1,
            id: "i-1".into(),
            run: "r".into(),
            target: "main".into(),
            digest: DIGEST.into(),
            payload: b"{}".to_vec(),
            file: "i-1.json".into(),
            state,
            decision: None,
            approvals_needed: needed,
            review_deadline: deadline,
            error: None,
            attempts: 0,
            not_before: 0,
            received_at: 0,
            updated_at: 0,
            applied: None,
        }
    }

    fn vote(reviewer: &str, verdict: &str, preview: Option<&str>) -> ReviewVote {
        ReviewVote {
            reviewer: reviewer.into(),
            verdict: verdict.into(),
            digest: DIGEST.into(),
            preview: preview.map(str::to_owned),
            comment: None,
            at: 0,
        }
    }

    #[test]
    fn only_an_open_review_of_the_same_bytes_takes_a_vote() {
        let open = row(State::AwaitingReview, 1, Some(100));
        check_open(&open, None, 99).unwrap();
        check_open(&open, Some(DIGEST), 99).unwrap();
        let refused =
            |row: &IntentRow, digest, now| check_open(row, digest, now).unwrap_err().to_string();
        assert_eq!(
            refused(&row(State::Rejected, 1, Some(100)), Some(DIGEST), 0),
            "intent i-1 is rejected, not awaiting review"
        );
        // The pipeline may not have expired it yet: the deadline alone refuses.
        assert_eq!(
            refused(&open, None, 100),
            "the review of intent i-1 expired at 1970-01-01T00:00:00.100Z"
        );
        assert_eq!(
            refused(&open, Some("sha256:bb"), 0),
            "intent i-1 has digest sha256:aa, not sha256:bb: the review names other bytes \
             than the intent holds"
        );
        // No deadline: never expires.
        check_open(&row(State::AwaitingReview, 1, None), None, i64::MAX).unwrap();
    }

    #[test]
    fn a_quorum_counts_distinct_reviewers_who_saw_the_same_rows() {
        let review = row(State::AwaitingReview, 2, None);
        let first = tally(&review, &[], "alice", "p1").unwrap();
        assert_eq!(
            first,
            Tally {
                voided: vec![],
                approvals: 1,
                needed: 2,
                quorum_met: false
            }
        );
        let votes = [vote("alice", "approve", Some("p1"))];
        assert!(matches!(
            tally(&review, &votes, "alice", "p1"),
            Err(ReviewError::AlreadyReviewed { .. })
        ));
        let second = tally(&review, &votes, "bob", "p1").unwrap();
        assert_eq!((second.approvals, second.quorum_met), (2, true));
        // Bob saw other rows: alice's approval is void, and she may approve again.
        let other = tally(&review, &votes, "bob", "p2").unwrap();
        assert_eq!(other.voided, ["alice"]);
        assert_eq!((other.approvals, other.quorum_met), (1, false));
        let again = tally(&review, &votes, "alice", "p2").unwrap();
        assert_eq!((again.voided.len(), again.approvals), (1, 1));
        // Approvals from before previews were bound (none recorded) are void too.
        let old = [vote("carol", "approve", None)];
        assert_eq!(tally(&review, &old, "bob", "p1").unwrap().voided, ["carol"]);
        // A decision needing 0 approvals still needs one.
        let zero = tally(&row(State::AwaitingReview, 0, None), &[], "a", "p").unwrap();
        assert_eq!((zero.needed, zero.quorum_met), (1, true));
        // Only approvals of the intent's own bytes count.
        let mut stale = vote("dan", "approve", Some("p1"));
        stale.digest = "sha256:bb".into();
        assert_eq!(approvals(&[stale.clone(), votes[0].clone()], DIGEST), 1);
        assert_eq!(tally(&review, &[stale], "bob", "p1").unwrap().approvals, 1);
    }

    #[test]
    fn a_vote_names_its_reviewer_and_keeps_its_comment_short() {
        assert!(matches!(check_vote(" ", None), Err(ReviewError::Reviewer)));
        assert!(matches!(
            check_vote(&"r".repeat(MAX_REVIEWER + 1), None),
            Err(ReviewError::Reviewer)
        ));
        check_vote(&"r".repeat(MAX_REVIEWER), Some(&"é".repeat(MAX_COMMENT))).unwrap();
        assert!(matches!(
            check_vote("alice", Some(&"c".repeat(MAX_COMMENT + 1))),
            Err(ReviewError::CommentTooLong)
        ));
    }

    fn queue_with_review(dir: &std::path::Path, needed: u32, deadline: i64) -> Queue {
        let text = r#"{"version":1,"id":"i-1","run":"r","ops":[{"op":"insert","table":"t","values":{"a":1}}],"reason":"r","provenance":{"agent":"a"}}"#;
        let mut q = Queue::open(dir).unwrap();
        q.write(|w| {
            w.admit(&Arrival {
                file: "i-1.json".into(),
                digest: seal::digest(text.as_bytes()),
                envelope: b"{}".to_vec(),
                keyid: "k".into(),
                intent: serde_json::from_str(text).unwrap(),
                bytes: text.as_bytes().to_vec(),
            })
        })
        .unwrap();
        let decision = serde_json::from_value(json!({
            "verdict": "review", "approvals": needed, "reasons": ["because"],
            "policy": "sha256:00", "decision_id": null,
        }))
        .unwrap();
        q.write(|w| {
            w.record_decision(
                "i-1",
                DecisionOutcome::Decided {
                    decision: &decision,
                    review_deadline: deadline,
                },
            )
        })
        .unwrap();
        q
    }

    #[test]
    fn a_review_past_its_deadline_takes_no_votes() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = queue_with_review(dir.path(), 1, 1);
        // The pipeline has not expired it yet, but the deadline has passed.
        for result in [
            approve(&mut q, "i-1", "alice", None, "p", "p", None).map(|p| p.state),
            reject(&mut q, "i-1", "bob", None, "no"),
        ] {
            let error = result.unwrap_err();
            assert!(matches!(error, ReviewError::Expired { .. }), "{error}");
            assert!(
                error
                    .to_string()
                    .contains("expired at 1970-01-01T00:00:00.001Z"),
                "{error}"
            );
        }
        assert!(q.reviews("i-1").unwrap().is_empty());
        assert_eq!(
            q.intent("i-1").unwrap().unwrap().state,
            State::AwaitingReview
        );
    }

    #[test]
    fn approvals_of_other_rows_are_void_and_the_record_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = queue_with_review(dir.path(), 2, i64::MAX);
        let digest = q.intent("i-1").unwrap().unwrap().digest;
        let bad = approve(&mut q, "i-1", "alice", Some("sha256:bad"), "p1", "p1", None);
        assert!(matches!(bad, Err(ReviewError::OtherBytes { .. })));
        let changed = approve(&mut q, "i-1", "alice", None, "p0", "p1", None);
        assert!(matches!(changed, Err(ReviewError::RowsChanged { .. })));
        let first = approve(&mut q, "i-1", "alice", Some(&digest), "p1", "p1", None).unwrap();
        assert_eq!((first.approvals, first.needed), (1, 2));
        let twice = approve(&mut q, "i-1", "alice", None, "p1", "p1", None);
        assert!(matches!(twice, Err(ReviewError::AlreadyReviewed { .. })));
        // Bob saw other rows: alice's approval no longer counts.
        let second = approve(&mut q, "i-1", "bob", None, "p2", "p2", Some("ok")).unwrap();
        assert_eq!((second.state, second.approvals), (State::AwaitingReview, 1));
        let votes = q.reviews("i-1").unwrap();
        assert_eq!(votes.len(), 1);
        assert_eq!(votes[0].preview.as_deref(), Some("p2"));
        let last = q.records("r").unwrap().pop().unwrap();
        let data: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
        assert_eq!(last.event, "approval");
        assert_eq!(data["data"]["voided"], json!(["alice"]));
        assert_eq!(data["data"]["by"], "bob");
        // Alice approves what bob saw: the quorum is met.
        let third = approve(&mut q, "i-1", "alice", None, "p2", "p2", None).unwrap();
        assert_eq!((third.state, third.approvals), (State::Approved, 2));
        assert_eq!(q.records("r").unwrap().pop().unwrap().event, "approved");
        // Decided: no more votes, with a rejection's reason or without.
        assert!(matches!(
            reject(&mut q, "i-1", "carol", None, " "),
            Err(ReviewError::NoReason)
        ));
        assert!(matches!(
            reject(&mut q, "i-1", "carol", None, "no"),
            Err(ReviewError::NotAwaitingReview { .. })
        ));
    }
}

//! The `/v1` JSON API: handlers, the documents they answer with, and errors.
//!
//! Decisions go through [`crate::review`] and undo through [`crate::undo`], exactly
//! as the CLI's do; this module only translates HTTP to those calls and back. Queue
//! access is blocking SQLite and runs on tokio's blocking pool.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{error, info, warn};

use super::AppState;
use super::auth::{Identity, Role, Via, csrf_matches};
use crate::apply::{Target, UndoImage};
use crate::clock::timestamp;
use crate::lifecycle::State as IntentState;
use crate::log::RecordLine;
use crate::queue::{Filter, IntentRow, Queue, QueueError, Record, ReviewVote};
use crate::review::{self, ReviewError};
use crate::undo;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "airlock_session";
/// The header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-airlock-csrf";
/// How long computing a preview for an approver may take.
const PREVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// An API error: a status and `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::UNAUTHORIZED, message);
        error.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"airlock\""),
        ));
        error
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// A failure on our side: logged in full, answered without detail.
    pub fn internal(context: &str, detail: impl std::fmt::Display) -> Self {
        error!(message = "review endpoint error", context, error = %detail);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context} failed; the Airlock log has the details"),
        )
    }

    fn code(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::NotFound(id) => ApiError::not_found(format!("no intent with id {id:?}")),
            QueueError::Transition(t) => ApiError::new(StatusCode::CONFLICT, t.to_string()),
            other => ApiError::internal("the queue", other),
        }
    }
}

/// The one place a review's refusal becomes an HTTP status: a malformed vote is a
/// bad request (400); a vote the intent does not take now (its state, deadline,
/// digest, the rows shown, a second vote by the same reviewer) is a conflict (409).
impl From<ReviewError> for ApiError {
    fn from(error: ReviewError) -> Self {
        let message = error.to_string();
        let status = match error {
            ReviewError::Queue(error) => return error.into(),
            ReviewError::Reviewer | ReviewError::CommentTooLong | ReviewError::NoReason => {
                StatusCode::BAD_REQUEST
            }
            ReviewError::NotAwaitingReview { .. }
            | ReviewError::Expired { .. }
            | ReviewError::OtherBytes { .. }
            | ReviewError::RowsChanged { .. }
            | ReviewError::AlreadyReviewed { .. } => StatusCode::CONFLICT,
        };
        ApiError::new(status, message)
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// A JSON body whose rejections are API errors naming the problem.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Parsed as a value first: serde would also take a struct from an array.
        let value = match Json::<Value>::from_request(req, state).await {
            Ok(Json(value)) => value,
            Err(rejection) => return Err(json_rejection(rejection)),
        };
        if !value.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        serde_json::from_value(value).map(Body).map_err(|e| {
            ApiError::bad_request(format!("the body is not what this route takes: {e}"))
        })
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = match rejection.status() {
        s @ (StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::PAYLOAD_TOO_LARGE) => s,
        _ => StatusCode::BAD_REQUEST,
    };
    let message = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "the body must be JSON, sent with Content-Type: application/json".to_owned()
        }
        _ => format!(
            "the body is not what this route takes: {}",
            rejection.body_text()
        ),
    };
    ApiError::new(status, message)
}

fn path_value(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    path.map(|Path(value)| value)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

// --- who is asking -----------------------------------------------------------------

impl FromRequestParts<AppState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let identity = authenticate(&parts.headers, state).await?;
        if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            check_same_origin(&parts.headers, &identity, state)?;
        }
        Ok(identity)
    }
}

async fn authenticate(headers: &HeaderMap, state: &AppState) -> Result<Identity, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        return match token.and_then(|t| state.auth.bearer(t)) {
            Some(identity) => Ok(identity),
            None => Err(failure(state, "the bearer token is not one Airlock knows").await),
        };
    }
    if let Some(id) = cookie(headers, SESSION_COOKIE) {
        return state
            .auth
            .session(&id)
            .ok_or_else(|| ApiError::unauthorized("the session has ended; sign in again"));
    }
    Err(ApiError::unauthorized(
        "sign in: send Authorization: Bearer <reviewer token>",
    ))
}

/// Counts a failed authentication and answers it, slowly once failures pile up.
async fn failure(state: &AppState, message: &str) -> ApiError {
    let Some((wait, retry_after)) = state.auth.failed() else {
        return ApiError::unauthorized(message);
    };
    // Bound the connections held waiting; past that, answer at once.
    if let Ok(_permit) = state.penalty.try_acquire() {
        tokio::time::sleep(wait).await;
    }
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too many failed sign-ins; wait and try again",
    );
    let seconds = retry_after.as_secs().max(1).to_string();
    if let Ok(value) = HeaderValue::from_str(&seconds) {
        error.headers.push((header::RETRY_AFTER, value));
    }
    error
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Refuses a cookie-authenticated change that lacks the session's CSRF token or that
/// the browser says comes from another origin.
fn check_same_origin(headers: &HeaderMap, who: &Identity, state: &AppState) -> ApiResult<()> {
    let Via::Session { csrf } = &who.via else {
        return Ok(());
    };
    let presented = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !csrf_matches(csrf, presented) {
        return Err(ApiError::forbidden(
            "this change needs the session's CSRF token in X-Airlock-CSRF",
        ));
    }
    cross_site(headers, state)
}

/// Refuses a request the browser marks as coming from another site.
fn cross_site(headers: &HeaderMap, state: &AppState) -> ApiResult<()> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(ApiError::forbidden(format!(
            "cross-site request refused (Sec-Fetch-Site: {site})"
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().ok();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let scheme = if state.tls { "https" } else { "http" };
        let ours = host.map(|h| format!("{scheme}://{h}"));
        // Behind a proxy, the page's origin is the public address.
        let public = state.public_origin.as_deref();
        if origin.is_none() || (origin != ours.as_deref() && origin != public) {
            return Err(ApiError::forbidden(
                "cross-origin request refused: Origin is not this endpoint",
            ));
        }
    }
    Ok(())
}

impl Identity {
    fn require(&self, role: Role, action: &str) -> ApiResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{} is {}; {action} needs the {role} role",
                self.name,
                self.role.with_article()
            )))
        }
    }
}

// --- session -----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    token: String,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignIn { token: <redacted> }")
    }
}

pub async fn whoami(who: Identity) -> Json<Value> {
    Json(identity_json(&who))
}

fn identity_json(who: &Identity) -> Value {
    let csrf = match &who.via {
        Via::Session { csrf } => Value::from(csrf.as_str()),
        Via::Bearer => Value::Null,
    };
    json!({ "name": who.name, "role": who.role, "csrf": csrf })
}

pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(body): Body<SignIn>,
) -> ApiResult<Response> {
    cross_site(&headers, &state)?;
    let session = match state.auth.sign_in(body.token.trim()) {
        Some(Ok(session)) => session,
        Some(Err(e)) => return Err(ApiError::internal("starting a session", e)),
        None => return Err(failure(&state, "that token is not one Airlock knows").await),
    };
    info!(message = "reviewer signed in", name = %session.name, role = %session.role);
    let mut cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        session.id,
        state.auth.session_ttl().as_secs()
    );
    if state.tls {
        cookie.push_str("; Secure");
    }
    let body = json!({ "name": session.name, "role": session.role, "csrf": session.csrf });
    let mut response = Json(body).into_response();
    let value =
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("setting the cookie", e))?;
    response.headers_mut().insert(header::SET_COOKIE, value);
    Ok(response)
}

pub async fn sign_out(
    State(state): State<AppState>,
    who: Identity,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.auth.sign_out(&id);
    }
    info!(message = "reviewer signed out", name = %who.name);
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("airlock_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(response)
}

// --- intents -----------------------------------------------------------------------

/// At most this many intents per page.
const MAX_PAGE: usize = 500;

pub async fn list_intents(
    State(state): State<AppState>,
    who: Identity,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    who.require(Role::Viewer, "reading intents")?;
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut filter_state = None;
    let (mut run, mut target, mut before) = (None, None, None);
    let mut limit = 50usize;
    for (key, value) in pairs {
        match key.as_str() {
            "state" => {
                filter_state = Some(value.parse::<IntentState>().map_err(|_| {
                    let all: Vec<&str> = IntentState::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::bad_request(format!(
                        "state: {value:?} is not a state; use one of {}",
                        all.join(", ")
                    ))
                })?);
            }
            "run" => run = Some(value),
            "target" => target = Some(value),
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit: {value:?} is not a number from 1 to {MAX_PAGE}"
                        ))
                    })?;
            }
            "before" => {
                // A queue position: 1 to 18 digits (always fits an i64).
                let cursor =
                    (1..=18).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
                before = Some(
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|_| cursor)
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "before: {value:?} is not a cursor from a previous page's `next`"
                            ))
                        })?,
                );
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; this route takes state, run, target, limit and before"
                )));
            }
        }
    }
    let (rows, votes) = state
        .with_queue(move |queue| {
            let filter = Filter {
                state: filter_state,
                run: run.as_deref(),
                target: target.as_deref(),
            };
            let rows = queue.page(&filter, before, limit)?;
            let votes = rows
                .iter()
                .map(|row| queue.reviews(&row.id))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((rows, votes))
        })
        .await?;
    let next = match rows.last() {
        Some(last) if rows.len() == limit => Value::from(last.seq.to_string()),
        _ => Value::Null,
    };
    let items: Vec<Value> = rows
        .iter()
        .zip(&votes)
        .map(|(row, votes)| summary(row, votes))
        .collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

pub async fn intent(
    State(state): State<AppState>,
    who: Identity,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    who.require(Role::Viewer, "reading intents")?;
    let id = path_value(id)?;
    let (row, votes, records) = state
        .with_queue({
            let id = id.clone();
            move |queue| {
                let row = queue.intent(&id)?.ok_or(QueueError::NotFound(id.clone()))?;
                Ok((row, queue.reviews(&id)?, queue.intent_records(&id)?))
            }
        })
        .await?;
    let mut doc = summary(&row, &votes);
    let payload: Value = serde_json::from_slice(&row.payload)
        .map_err(|e| ApiError::internal("reading the stored intent", e))?;
    let target = state.targets.get(&row.target).cloned();
    let (preview, applied) = if row.state.blocks_run() {
        (
            state.previews.get(target, &row, state.max_rows).await,
            Value::Null,
        )
    } else if matches!(row.state, IntentState::Applied | IntentState::Undone) {
        (Value::Null, applied_images(target, &row).await)
    } else {
        (Value::Null, Value::Null)
    };
    if let Value::Object(map) = &mut doc {
        map.insert(
            "provenance".into(),
            payload.get("provenance").cloned().unwrap_or(Value::Null),
        );
        map.insert("payload".into(), payload);
        map.insert("file".into(), row.file.clone().into());
        map.insert("votes".into(), votes.iter().map(vote_json).collect());
        map.insert("preview".into(), preview);
        map.insert("applied".into(), applied);
        map.insert("history".into(), records.iter().map(record_json).collect());
        map.insert("error".into(), row.error.clone().unwrap_or(Value::Null));
    }
    Ok(Json(doc))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    digest: String,
    /// The `preview.digest` the reviewer was shown: the approval binds those rows.
    preview_digest: String,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reject {
    digest: String,
    comment: String,
}

pub async fn approve(
    State(state): State<AppState>,
    who: Identity,
    id: Result<Path<String>, PathRejection>,
    Body(body): Body<Approve>,
) -> ApiResult {
    who.require(Role::Approver, "approving")?;
    let id = path_value(id)?;
    let comment = body.comment.filter(|c| !c.trim().is_empty());
    review::check_vote(&who.name, comment.as_deref())?;
    let row = state
        .with_queue({
            let id = id.clone();
            move |queue| queue.intent(&id)?.ok_or(QueueError::NotFound(id))
        })
        .await?;
    // Refused before anything is computed if the intent takes no vote now; the
    // queue's transaction checks again.
    review::check_open(&row, Some(&body.digest), crate::clock::now_ms())?;
    // The rows as they are now: the approval is refused unless the reviewer saw them.
    let target = state.targets.get(&row.target).cloned();
    let shown = state.previews.fresh(target, &row, state.max_rows).await;
    let Some(now) = shown["digest"].as_str().map(str::to_owned) else {
        let why = shown["error"]["message"].as_str().unwrap_or("no preview");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "cannot preview the intent's rows now ({why}), so it cannot be \
                 approved yet; try again"
            ),
        ));
    };
    let reviewer = who.name.clone();
    let progress = state
        .with_queue_as({
            let id = id.clone();
            move |queue| {
                review::approve(
                    queue,
                    &id,
                    &reviewer,
                    Some(&body.digest),
                    &body.preview_digest,
                    &now,
                    comment.as_deref(),
                )
            }
        })
        .await?;
    info!(message = "approved", id = %id, by = %who.name, state = %progress.state, approvals = progress.approvals, needed = progress.needed);
    state.wake();
    Ok(Json(json!({
        "id": id,
        "state": progress.state,
        "approvals": progress.approvals,
        "needed": progress.needed,
    })))
}

pub async fn reject(
    State(state): State<AppState>,
    who: Identity,
    id: Result<Path<String>, PathRejection>,
    Body(body): Body<Reject>,
) -> ApiResult {
    who.require(Role::Approver, "rejecting")?;
    let id = path_value(id)?;
    let reviewer = who.name.clone();
    let next = state
        .with_queue_as({
            let id = id.clone();
            move |queue| review::reject(queue, &id, &reviewer, Some(&body.digest), &body.comment)
        })
        .await?;
    info!(message = "rejected", id = %id, by = %who.name);
    state.wake();
    Ok(Json(json!({ "id": id, "state": next })))
}

// --- runs --------------------------------------------------------------------------

pub async fn runs(State(state): State<AppState>, who: Identity) -> ApiResult {
    who.require(Role::Viewer, "reading runs")?;
    let runs = state.with_queue(|queue| queue.runs()).await?;
    Ok(Json(json!({ "items": runs })))
}

/// Most intents and records one run's page carries (the newest).
const RUN_INTENTS: usize = 500;
const RUN_RECORDS: usize = 2_000;

pub async fn run(
    State(state): State<AppState>,
    who: Identity,
    run: Result<Path<String>, PathRejection>,
) -> ApiResult {
    who.require(Role::Viewer, "reading runs")?;
    let run = path_value(run)?;
    let found = state
        .with_queue({
            let run = run.clone();
            move |queue| {
                let Some(summary) = queue.run(&run)? else {
                    return Ok(None);
                };
                let filter = Filter {
                    run: Some(&run),
                    ..Filter::default()
                };
                let mut rows = queue.page(&filter, None, RUN_INTENTS)?;
                rows.reverse();
                let votes = rows
                    .iter()
                    .map(|row| queue.reviews(&row.id))
                    .collect::<Result<Vec<_>, _>>()?;
                let records = queue.last_records(&run, RUN_RECORDS)?;
                Ok(Some((summary, rows, votes, records)))
            }
        })
        .await?;
    let Some((run_summary, rows, votes, records)) = found else {
        return Err(ApiError::not_found(format!("no run named {run:?}")));
    };
    let total: u64 = run_summary.counts.values().sum();
    let intents: Vec<Value> = rows
        .iter()
        .zip(&votes)
        .map(|(row, votes)| summary(row, votes))
        .collect();
    Ok(Json(json!({
        "run": run_summary.run,
        "counts": run_summary.counts,
        "records": run_summary.records,
        "head": run_summary.head,
        "intents": intents,
        "history": records.iter().map(record_json).collect::<Vec<_>>(),
        "omitted": {
            "intents": total.saturating_sub(rows.len() as u64),
            "history": u64::try_from(run_summary.records).unwrap_or(0).saturating_sub(records.len() as u64),
        },
    })))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UndoBody {
    #[serde(default)]
    intent: Option<String>,
    #[serde(default)]
    force: bool,
}

pub async fn undo_run(
    State(state): State<AppState>,
    who: Identity,
    run: Result<Path<String>, PathRejection>,
    Body(body): Body<UndoBody>,
) -> ApiResult {
    who.require(Role::Admin, "undoing a run")?;
    let run = path_value(run)?;
    let request = undo::Request {
        run: run.clone(),
        intent: body.intent,
        force: body.force,
        by: who.name.clone(),
    };
    // One undo at a time, on a queue connection of its own: an undo holds its
    // connection across target transactions.
    let _one = state.undo_lock.lock().await;
    let mut queue = state
        .open_queue()
        .map_err(|e| ApiError::internal("opening the queue", e))?;
    let targets = state.targets.clone();
    let open_target = move |name: &str| {
        targets.get(name).cloned().ok_or_else(|| {
            undo::UndoError::NotFound(format!("no target named {name:?} is configured"))
        })
    };
    let outcome = undo::undo(&mut queue, open_target, &request)
        .await
        .map_err(undo_error)?;
    let answer = undo_json(&outcome);
    let count = |key: &str| answer[key].as_array().map_or(0, Vec::len);
    info!(
        message = "undo",
        run = %run,
        by = %who.name,
        force = request.force,
        outcome = answer["outcome"].as_str().unwrap_or("?"),
        reverted = count("reverted"),
        recorded_only = count("recorded_only"),
        forced = count("forced"),
        conflicts = count("conflicts"),
    );
    state.wake();
    Ok(Json(answer))
}

fn undo_error(error: undo::UndoError) -> ApiError {
    match error {
        undo::UndoError::NotFound(message) => ApiError::not_found(message),
        undo::UndoError::Queue(e) => e.into(),
        undo::UndoError::Target { .. } => {
            warn!(message = "undo could not reach its target", error = %error);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        other => ApiError::new(StatusCode::CONFLICT, other.to_string()),
    }
}

fn undo_json(outcome: &undo::Outcome) -> Value {
    let mut doc = json!({
        "outcome": "nothing", "reverted": [], "recorded_only": [], "forced": [],
        "conflicts": [], "later": [],
    });
    match outcome {
        undo::Outcome::Nothing => {}
        undo::Outcome::Refused { later, .. } => {
            doc["outcome"] = "refused".into();
            doc["later"] = later
                .iter()
                .map(|l| json!({ "intent_id": l.intent_id, "table": l.table, "key": l.key }))
                .collect();
        }
        undo::Outcome::Conflicts {
            undone, conflicts, ..
        } => {
            doc["outcome"] = "conflicts".into();
            doc["reverted"] = json!(undone);
            doc["conflicts"] = json!(conflicts);
        }
        undo::Outcome::Undone {
            reverted,
            recorded_only,
            forced,
        } => {
            doc["outcome"] = "undone".into();
            doc["reverted"] = json!(reverted);
            doc["recorded_only"] = json!(recorded_only);
            doc["forced"] = json!(forced);
        }
    }
    doc
}

// --- events ------------------------------------------------------------------------

/// Server-sent events: `change` (data: a number that grows) whenever the queue
/// changes, first once on connect. Ends when the endpoint stops.
pub async fn events(
    State(state): State<AppState>,
    who: Identity,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    who.require(Role::Viewer, "watching the queue")?;
    let changes = state.changes.clone();
    let stop = state.stop.clone();
    let stream = futures_util::stream::unfold(
        (changes, stop, true),
        |(mut changes, mut stop, first)| async move {
            if !first {
                tokio::select! {
                    changed = changes.changed() => changed.ok()?,
                    () = super::stopped(&mut stop) => return None,
                }
            }
            if *stop.borrow() {
                return None;
            }
            let marker = *changes.borrow_and_update();
            let event = Event::default().event("change").data(marker.to_string());
            Some((Ok(event), (changes, stop, false)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

// --- fallbacks ---------------------------------------------------------------------

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route; GET /v1/openapi.json lists them")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method; GET /v1/openapi.json lists them",
    )
}

// --- documents ---------------------------------------------------------------------

/// An intent as lists show it.
fn summary(row: &IntentRow, votes: &[ReviewVote]) -> Value {
    let intent: Value = serde_json::from_slice(&row.payload).unwrap_or(Value::Null);
    let ops = intent["ops"].as_array().map_or(&[][..], Vec::as_slice);
    let mut tables: Vec<&str> = ops.iter().filter_map(|op| op["table"].as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let approvals = review::approvals(votes, &row.digest);
    let review = if row.approvals_needed > 0 {
        json!({
            "approvals": approvals,
            "needed": row.approvals_needed,
            "deadline": row.review_deadline.map(timestamp),
        })
    } else {
        Value::Null
    };
    let decision = row
        .decision
        .as_ref()
        .and_then(|d| serde_json::to_value(d).ok())
        .unwrap_or(Value::Null);
    json!({
        "id": row.id,
        "run": row.run,
        "target": row.target,
        "state": row.state,
        "final": row.state.is_final(),
        "digest": row.digest,
        "reason": intent["reason"],
        "agent": intent["provenance"]["agent"],
        "ops": ops.len(),
        "tables": tables,
        "received_at": timestamp(row.received_at),
        "updated_at": timestamp(row.updated_at),
        "decision": decision,
        "review": review,
    })
}

fn vote_json(vote: &ReviewVote) -> Value {
    json!({
        "reviewer": vote.reviewer,
        "verdict": vote.verdict,
        "digest": vote.digest,
        "comment": vote.comment,
        "at": timestamp(vote.at),
    })
}

fn record_json(record: &Record) -> Value {
    // The queue wrote the body; should it not read back, `at` and `data` are null.
    let line: Option<RecordLine> = serde_json::from_slice(&record.body).ok();
    json!({
        "run": record.run,
        "seq": record.seq,
        "intent": record.intent_id,
        "event": record.event,
        "at": line.as_ref().map(|line| timestamp(line.at)),
        "data": line.map(|line| Value::Object(line.data)),
        "digest": record.digest,
    })
}

/// Recent previews, so pages refreshing on every queue change do not each run a
/// transaction on the target: at most one preview per intent per `PREVIEW_FRESH`,
/// and at most `PREVIEWS_AT_ONCE` in flight.
#[derive(Debug)]
pub struct Previews {
    recent: std::sync::Mutex<BTreeMap<String, (std::time::Instant, Value)>>,
    running: tokio::sync::Semaphore,
}

/// How long a preview is shown before it is computed again.
const PREVIEW_FRESH: Duration = Duration::from_secs(2);
/// Previews running on targets at once.
const PREVIEWS_AT_ONCE: usize = 4;

impl Default for Previews {
    fn default() -> Self {
        Self {
            recent: std::sync::Mutex::new(BTreeMap::new()),
            running: tokio::sync::Semaphore::new(PREVIEWS_AT_ONCE),
        }
    }
}

impl Previews {
    async fn get(&self, target: Option<Arc<dyn Target>>, row: &IntentRow, max_rows: u64) -> Value {
        // The digest is part of the key: a preview is of exact bytes.
        let key = format!("{}\n{}", row.id, row.digest);
        let cached = |recent: &std::sync::Mutex<BTreeMap<String, (std::time::Instant, Value)>>| {
            let recent = recent.lock().ok()?;
            let (at, value) = recent.get(&key)?;
            (at.elapsed() < PREVIEW_FRESH).then(|| value.clone())
        };
        if let Some(value) = cached(&self.recent) {
            return value;
        }
        let Ok(_permit) = self.running.acquire().await else {
            return json!({ "error": { "message": "previews are shut down" } });
        };
        // Another request may have computed it while this one waited.
        if let Some(value) = cached(&self.recent) {
            return value;
        }
        self.compute(key, target, row, max_rows).await
    }

    /// A preview computed now, never a cached one (what an approval is checked
    /// against); it replaces the cached one, so the page shows it next.
    async fn fresh(
        &self,
        target: Option<Arc<dyn Target>>,
        row: &IntentRow,
        max_rows: u64,
    ) -> Value {
        let Ok(_permit) = self.running.acquire().await else {
            return json!({ "error": { "message": "previews are shut down" } });
        };
        let key = format!("{}\n{}", row.id, row.digest);
        self.compute(key, target, row, max_rows).await
    }

    async fn compute(
        &self,
        key: String,
        target: Option<Arc<dyn Target>>,
        row: &IntentRow,
        max_rows: u64,
    ) -> Value {
        let value = preview(target, row, max_rows).await;
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|_, (at, _)| at.elapsed() < PREVIEW_FRESH);
            recent.insert(key, (std::time::Instant::now(), value.clone()));
        }
        value
    }
}

/// What the intent would do to its target now, from a rolled-back transaction, with
/// the `digest` an approval of it binds (absent when nothing could be shown).
async fn preview(target: Option<Arc<dyn Target>>, row: &IntentRow, max_rows: u64) -> Value {
    let Some(target) = target else {
        return json!({ "error": { "message": format!("no target named {:?} is configured", row.target) } });
    };
    let intent = match row.intent() {
        Ok(intent) => intent,
        Err(e) => return json!({ "error": { "message": e.to_string() } }),
    };
    match tokio::time::timeout(
        PREVIEW_TIMEOUT,
        review::show(target.as_ref(), row, max_rows),
    )
    .await
    {
        Ok(Ok(shown)) => match shown.preview {
            Ok(preview) => {
                let ops = preview
                    .ops
                    .iter()
                    .map(|op| {
                        images_json(op.index, op_kind(&intent, op.index), op.rows, &op.images)
                    })
                    .collect::<Vec<_>>();
                json!({ "already": preview.already, "ops": ops, "digest": shown.digest })
            }
            // Reviewers are humans: they see the detail the agent never does.
            Err(error) => json!({
                "error": {
                    "op": error.op, "code": error.code, "message": error.message,
                    "detail": error.detail,
                },
                "digest": shown.digest,
            }),
        },
        Ok(Err(error)) => json!({ "error": {
            "op": error.op, "code": error.code, "message": error.message, "detail": error.detail,
        } }),
        Err(_) => json!({ "error": { "message": "the target did not answer in time" } }),
    }
}

/// What an applied intent did, from its ledger row's undo images.
async fn applied_images(target: Option<Arc<dyn Target>>, row: &IntentRow) -> Value {
    let intent = row.intent().ok();
    let Some(target) = target else {
        return Value::Null;
    };
    match tokio::time::timeout(PREVIEW_TIMEOUT, target.ledger_entry(&row.id)).await {
        Ok(Ok(Some(entry))) => {
            let mut by_op: BTreeMap<usize, Vec<UndoImage>> = BTreeMap::new();
            for image in entry.undo {
                by_op.entry(image.op).or_default().push(image);
            }
            let ops: Vec<Value> = by_op
                .iter()
                .map(|(index, images)| {
                    let kind = intent.as_ref().and_then(|i| op_kind(i, *index));
                    images_json(*index, kind, images.len() as u64, images)
                })
                .collect();
            json!({ "applied_at": timestamp(entry.applied_at_ms), "ops": ops })
        }
        Ok(Ok(None)) => Value::Null,
        Ok(Err(error)) => json!({ "error": { "message": error.message } }),
        Err(_) => json!({ "error": { "message": "the target did not answer in time" } }),
    }
}

fn images_json(index: usize, kind: Option<&str>, rows: u64, images: &[UndoImage]) -> Value {
    let table = images.first().map(|i| i.table.clone());
    let side = |f: fn(&UndoImage) -> &Option<crate::apply::Image>| -> Vec<Value> {
        images
            .iter()
            .map(|i| f(i).clone().map_or(Value::Null, Value::Object))
            .collect()
    };
    json!({
        "index": index,
        "op": kind,
        "table": table,
        "rows": rows,
        "before": side(|i| &i.before),
        "after": side(|i| &i.after),
    })
}

/// The kind of op `index` (`insert`, …).
fn op_kind(intent: &airlock_intent::Intent, index: usize) -> Option<&'static str> {
    intent.ops.get(index).map(|op| op.kind().as_str())
}

impl AppState {
    /// Runs `f` on the endpoint's queue connection, on the blocking pool.
    async fn with_queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> Result<T, QueueError> + Send + 'static,
    ) -> ApiResult<T> {
        self.with_queue_as(f).await
    }

    /// [`AppState::with_queue`] for `f` with its own error (a review's refusal).
    async fn with_queue_as<T: Send + 'static, E: Into<ApiError> + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> Result<T, E> + Send + 'static,
    ) -> ApiResult<T> {
        let queue = self.queue.clone();
        tokio::task::spawn_blocking(move || {
            let mut queue = queue
                .lock()
                .map_err(|_| ApiError::internal("the queue", "its lock was poisoned"))?;
            f(&mut queue).map_err(Into::into)
        })
        .await
        .map_err(|e| ApiError::internal("the queue", e))?
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::lifecycle::State;

    #[test]
    fn the_published_states_are_exactly_the_stored_states() {
        // No state the queue never writes in `openapi.json` (issue 11).
        let doc: Value = serde_json::from_str(super::super::OPENAPI).unwrap();
        let stored: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(doc["components"]["schemas"]["State"]["enum"], json!(stored));
        let params = doc["paths"]["/v1/intents"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let filter = params.iter().find(|p| p["name"] == "state").unwrap();
        assert_eq!(filter["schema"]["enum"], json!(stored));
    }
}

//! The review endpoint: a JSON API under `/v1` and the web page at `/`, for human
//! approvers (docs/review-api.md). Placeholder module; filled in by issue 6.

/// The web page's files, compiled into the binary (no front-end build step).
pub mod web {
    pub const INDEX_HTML: &str = include_str!("web/index.html");
    pub const APP_JS: &str = include_str!("web/app.js");
    pub const APP_CSS: &str = include_str!("web/app.css");
}

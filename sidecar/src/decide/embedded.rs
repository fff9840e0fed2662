//! Rego evaluated in-process with `regorus`: the embedded policy engine.
//!
//! A policy is a set of `.rego` files (Rego v1 syntax) plus an optional `data.json`,
//! parsed and compiled at [`EmbeddedPolicy::load`], so syntax and compile errors
//! surface at start-up, naming the file and line, and each evaluation only pays for
//! running the rules. The compiled policy is immutable and shared, so
//! [`EmbeddedPolicy::evaluate`] takes `&self` and runs on any number of threads at
//! once without a lock. Reloading when the files change is [`super::ReloadingPolicy`]'s
//! job: it compiles a new `EmbeddedPolicy` and swaps it in.
//!
//! What is evaluated is the document of package `airlock.authz` (see [`RULE`]).
//! regorus evaluates rules, not packages, so a one-line wrapper module
//! (`decision := data.airlock.authz`) is compiled alongside the policy and is the
//! entry point; it is not part of the policy's identity.
//!
//! Not supported: Rego v0 syntax, bundles and `.manifest` files, nested directories,
//! and a time limit on evaluation (policies are operator code, trusted to terminate).

use std::fs;
use std::path::{Path, PathBuf};

use regorus::{CompiledPolicy, Engine, Value};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Decision, PolicyError};

/// The document evaluated for each intent: OPA's `/v1/data/airlock/authz`.
pub const RULE: &str = "data.airlock.authz";

/// The default policy, compiled into the binary.
const DEFAULT_FILES: [(&str, &str); 2] = [
    (
        "airlock.rego",
        include_str!("../../../examples/policies/airlock.rego"),
    ),
    (
        "data.json",
        include_str!("../../../examples/policies/data.json"),
    ),
];

/// The file name of the optional data document in a policy directory.
const DATA_FILE: &str = "data.json";

/// The wrapper that makes the package document evaluable as a rule.
const ENTRY_FILE: &str = "<airlock entry point>";
const ENTRY_PACKAGE: &str = "__airlock_entry";
const ENTRY_RULE: &str = "data.__airlock_entry.decision";

/// Where a policy comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PolicySource {
    /// The default policy shipped in the binary (`examples/policies/airlock.rego`
    /// and `examples/policies/data.json`).
    #[default]
    Default,
    /// A `.rego` file, or a directory: every `*.rego` in it except `*_test.rego`,
    /// plus `data.json` if present. Subdirectories are not read.
    Path(PathBuf),
}

/// A loaded, compiled Rego policy.
#[derive(Clone, Debug)]
pub struct EmbeddedPolicy {
    identity: String,
    files: Vec<String>,
    compiled: CompiledPolicy,
}

/// The source files of a policy, sorted by name: `.rego` modules and data documents.
#[derive(Debug)]
pub(super) struct Sources {
    /// Where they came from, for messages.
    origin: String,
    /// (file name, contents), sorted by name.
    files: Vec<(String, String)>,
}

impl EmbeddedPolicy {
    /// Reads, parses and compiles a policy.
    pub fn load(source: PolicySource) -> Result<Self, PolicyError> {
        Self::compile(Sources::of(&source)?)
    }

    /// Parses and compiles policy sources already read.
    pub(super) fn compile(sources: Sources) -> Result<Self, PolicyError> {
        let identity = sources.identity();
        let mut engine = sources.engine()?;
        engine
            .add_policy(
                ENTRY_FILE.to_owned(),
                format!("package {ENTRY_PACKAGE}\n\ndecision := {RULE}\n"),
            )
            .map_err(|err| compile_error(&sources, &err))?;
        let compiled = engine
            .compile_with_entrypoint(&ENTRY_RULE.into())
            .map_err(|err| compile_error(&sources, &err))?;
        Ok(Self {
            identity,
            files: sources.files.into_iter().map(|(name, _)| name).collect(),
            compiled,
        })
    }

    /// `sha256:<hex>` over the sorted (file name, contents) of every file loaded.
    /// Any change to a file, or a file added or removed, changes it.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The names of the files loaded, sorted.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Evaluates the policy on one input document (see [`super::build_input`]).
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Decision, PolicyError> {
        let input = Value::deserialize(input)
            .map_err(|err| PolicyError::Eval(format!("input document: {err}")))?;
        let result = self
            .compiled
            .eval_with_input(input)
            .map_err(|err| PolicyError::Eval(one_line(&err)))?;
        let document = match result {
            Value::Undefined => None,
            value => Some(serde_json::to_value(&value).map_err(|err| {
                PolicyError::Malformed(format!("result is not representable as JSON: {err}"))
            })?),
        };
        Decision::from_result(document, &self.identity, None)
    }
}

/// One Rego test rule and whether it passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegoTest {
    /// The rule's full path, e.g. `data.airlock.authz_test.test_insert_is_allowed`.
    pub name: String,
    /// Whether it evaluated to `true`.
    pub passed: bool,
    /// What it evaluated to instead, or the error it raised, when it failed.
    pub failure: Option<String>,
}

/// Runs the Rego tests in `dir`, as `opa test dir` does: loads every `*.rego`
/// (including `*_test.rego`) and `data.json`, and evaluates every rule whose name
/// starts with `test_`, in every package. A test passes when it evaluates to `true`.
/// Results are sorted by name.
pub fn run_rego_tests(dir: &Path) -> Result<Vec<RegoTest>, PolicyError> {
    const LIST_FILE: &str = "<airlock test lister>";
    const LIST_MODULE: &str = "package __airlock_tests\n\nlisted := true\n";
    const LIST_RULE: &str = "data.__airlock_tests.listed";

    let sources = Sources::read(dir, true)?;
    let mut engine = sources.engine()?;
    engine
        .add_policy(LIST_FILE.to_owned(), LIST_MODULE.to_owned())
        .map_err(|err| compile_error(&sources, &err))?;
    // Compiling checks the whole policy and yields the table of every rule by path.
    let compiled = engine
        .compile_with_entrypoint(&LIST_RULE.into())
        .map_err(|err| compile_error(&sources, &err))?;
    let mut names: Vec<&String> = compiled
        .get_rules()
        .keys()
        .filter(|path| {
            path.rsplit('.')
                .next()
                .is_some_and(|name| name.starts_with("test_"))
        })
        .collect();
    names.sort();
    let tests = names
        .into_iter()
        .map(|name| {
            // A fresh copy per test: nothing one test does can leak into the next.
            let failure = match engine.clone().eval_rule(name.clone()) {
                Ok(Value::Bool(true)) => None,
                Ok(Value::Undefined) => Some("undefined".to_owned()),
                Ok(other) => Some(format!("evaluated to {other}")),
                Err(err) => Some(one_line(&err)),
            };
            RegoTest {
                name: name.clone(),
                passed: failure.is_none(),
                failure,
            }
        })
        .collect();
    Ok(tests)
}

impl Sources {
    /// The files of a policy source (tests excluded).
    pub(super) fn of(source: &PolicySource) -> Result<Self, PolicyError> {
        match source {
            PolicySource::Default => Ok(Self {
                origin: "the default policy".to_owned(),
                files: DEFAULT_FILES
                    .iter()
                    .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
                    .collect(),
            }),
            PolicySource::Path(path) => Self::read(path, false),
        }
    }

    /// Reads a `.rego` file, or a policy directory (with its `*_test.rego` files only
    /// when `with_tests`).
    fn read(path: &Path, with_tests: bool) -> Result<Self, PolicyError> {
        let origin = path.display().to_string();
        let load_error = |path: &Path, err: &dyn std::fmt::Display| PolicyError::Load {
            path: path.display().to_string(),
            message: err.to_string(),
        };
        let metadata = fs::metadata(path).map_err(|err| load_error(path, &err))?;
        let mut paths = Vec::new();
        if metadata.is_dir() {
            for entry in fs::read_dir(path).map_err(|err| load_error(path, &err))? {
                let entry = entry.map_err(|err| load_error(path, &err))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let wanted = name == DATA_FILE
                    || (name.ends_with(".rego") && (with_tests || !name.ends_with("_test.rego")));
                if wanted && entry.path().is_file() {
                    paths.push((name, entry.path()));
                }
            }
            if !paths.iter().any(|(name, _)| name.ends_with(".rego")) {
                return Err(PolicyError::Load {
                    path: origin,
                    message: "the directory holds no .rego files".to_owned(),
                });
            }
        } else {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| origin.clone());
            paths.push((name, path.to_owned()));
        }
        paths.sort();
        let files = paths
            .into_iter()
            .map(|(name, path)| {
                let text = fs::read_to_string(&path).map_err(|err| load_error(&path, &err))?;
                Ok((name, text))
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self { origin, files })
    }

    /// `sha256:<hex>` over every (name, contents), each length-prefixed so no two
    /// different file sets hash the same bytes.
    pub(super) fn identity(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, text) in &self.files {
            for part in [name.as_bytes(), text.as_bytes()] {
                hasher.update((part.len() as u64).to_be_bytes());
                hasher.update(part);
            }
        }
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }

    /// A fresh engine holding every module and the data document, parsed.
    fn engine(&self) -> Result<Engine, PolicyError> {
        let mut engine = Engine::new();
        for (name, text) in &self.files {
            if name == DATA_FILE {
                let data: serde_json::Value =
                    serde_json::from_str(text).map_err(|err| PolicyError::Load {
                        path: format!("{} ({name})", self.origin),
                        message: format!("invalid JSON: {err}"),
                    })?;
                if !data.is_object() {
                    return Err(PolicyError::Load {
                        path: format!("{} ({name})", self.origin),
                        message: "the data document must be a JSON object".to_owned(),
                    });
                }
                let data = Value::deserialize(&data).map_err(|err| PolicyError::Load {
                    path: format!("{} ({name})", self.origin),
                    message: err.to_string(),
                })?;
                engine.add_data(data).map_err(|err| PolicyError::Load {
                    path: format!("{} ({name})", self.origin),
                    message: one_line(&err),
                })?;
            } else {
                engine
                    .add_policy(name.clone(), text.clone())
                    .map_err(|err| PolicyError::Compile {
                        file: name.clone(),
                        message: one_line(&err),
                    })?;
            }
        }
        Ok(engine)
    }
}

/// A compile error found after parsing (unsafe variables, unknown functions,
/// recursion): regorus names the file in its message, so find which one.
fn compile_error(sources: &Sources, err: &anyhow::Error) -> PolicyError {
    // regorus writes the location as `--> file:line:col`.
    let raw = format!("{err:#}");
    let file = sources
        .files
        .iter()
        .map(|(name, _)| name)
        .find(|name| raw.contains(&format!("--> {name}:")))
        .cloned()
        .unwrap_or_else(|| sources.origin.clone());
    PolicyError::Compile {
        file,
        message: one_line(err),
    }
}

/// regorus formats errors over several lines (location, source line, caret,
/// message); logs want one. Keeps `file:line:col`, the source text and the message.
fn one_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .map(|line| line.trim_start_matches("-->").trim())
        .filter(|line| !line.is_empty() && line.chars().any(|c| c != '^' && c != '|' && c != ' '))
        .collect();
    parts.join(" | ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::lifecycle::Verdict;

    fn ops_input(ops: serde_json::Value) -> serde_json::Value {
        json!({"version": 1, "ops": ops})
    }

    fn op(kind: &str, table: &str) -> serde_json::Value {
        json!({"index": 0, "kind": kind, "table": table, "schema": null, "name": table,
               "columns": []})
    }

    #[test]
    fn default_policy_decides() {
        let policy = EmbeddedPolicy::load(PolicySource::Default).unwrap();
        assert!(policy.identity().starts_with("sha256:"));
        assert_eq!(policy.files(), ["airlock.rego", "data.json"]);

        let allowed = policy
            .evaluate(&ops_input(json!([op("insert", "t")])))
            .unwrap();
        assert_eq!(allowed.verdict, Verdict::Allow);
        assert_eq!(allowed.policy, policy.identity());

        let review = policy
            .evaluate(&ops_input(json!([op("delete", "t")])))
            .unwrap();
        assert_eq!(review.verdict, Verdict::Review { approvals: 1 });
        assert_eq!(review.reasons, ["deletes from t need human review"]);

        let denied = policy
            .evaluate(&ops_input(json!([op("update", "audit_log")])))
            .unwrap();
        assert_eq!(denied.verdict, Verdict::Deny);
        assert!(
            denied.reasons[0].contains("audit_log"),
            "{:?}",
            denied.reasons
        );
    }

    #[test]
    fn one_line_keeps_location_and_message() {
        let mut engine = Engine::new();
        let err = engine
            .add_policy(
                "p.rego".into(),
                "package p\n\nallow if {\n  1 ==\n}\n".into(),
            )
            .unwrap_err();
        let line = one_line(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("p.rego:5:1"), "{line}");
        assert!(line.contains("expecting expression"), "{line}");
    }

    #[test]
    fn evaluation_is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EmbeddedPolicy>();
        let policy = EmbeddedPolicy::load(PolicySource::Default).unwrap();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let policy = &policy;
                    scope.spawn(move || {
                        let kind = if i % 2 == 0 { "insert" } else { "delete" };
                        let decision = policy.evaluate(&ops_input(json!([op(kind, "t")]))).unwrap();
                        (kind, decision.verdict)
                    })
                })
                .collect();
            for handle in handles {
                let (kind, verdict) = handle.join().unwrap();
                let expected = if kind == "insert" {
                    Verdict::Allow
                } else {
                    Verdict::Review { approvals: 1 }
                };
                assert_eq!(verdict, expected);
            }
        });
    }
}

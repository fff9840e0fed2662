//! `airlock submit`: the agent's side of the intake protocol, done right.
//!
//! An intent must appear in the intent directory whole: written under a temporary
//! dotfile name, flushed to disk, then renamed to its final `.json` name (a rename
//! within one directory is atomic). The final name is `<id>.json` when the document
//! has a valid `id`, so its outcome file has the same name in the results directory.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` into `dir` atomically, named `<id>.json` when the bytes hold a
/// valid intent id, else `fallback` (given `.json` if it lacks it). Returns the path.
pub fn submit_bytes(dir: &Path, fallback: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let name = intent_file_name(bytes).unwrap_or_else(|| {
        let base = Path::new(fallback)
            .file_name()
            .map(|n| n.to_string_lossy().trim_start_matches('.').to_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "intent".to_owned());
        if base.ends_with(".json") {
            base
        } else {
            format!("{base}.json")
        }
    });
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let path = dir.join(&name);
    let written = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written.and_then(|()| fs::rename(&tmp, &path)) {
        Ok(()) => Ok(path),
        Err(error) => {
            let _ = fs::remove_file(&tmp);
            Err(error)
        }
    }
}

/// `<id>.json` for a document whose `id` is a valid intent id.
fn intent_file_name(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let doc: IdOnly = serde_json::from_slice(bytes).ok()?;
    airlock_intent::IntentId::parse(&doc.id)
        .ok()
        .map(|id| format!("{id}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_by_id_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = submit_bytes(dir.path(), "x.json", br#"{"id":"abc-1","other":1}"#).unwrap();
        assert_eq!(path, dir.path().join("abc-1.json"));
        let path = submit_bytes(dir.path(), "/some/where/bad", b"not json").unwrap();
        assert_eq!(path, dir.path().join("bad.json"));
        let path = submit_bytes(dir.path(), "y.json", br#"{"id":"../../etc/passwd"}"#).unwrap();
        assert_eq!(path, dir.path().join("y.json"));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')));
    }
}

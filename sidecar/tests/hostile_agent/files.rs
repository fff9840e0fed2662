//! Attacks: files (filled in by its change).

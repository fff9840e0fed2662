//! Attacks: approval (filled in by its change).

//! Attacks: names (filled in by its change).

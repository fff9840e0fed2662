//! Attacks: intake (filled in by its change).

//! Attacks: review_port (filled in by its change).

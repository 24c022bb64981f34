//! Command-line front.

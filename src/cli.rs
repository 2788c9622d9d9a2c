//! CLI. (being written)

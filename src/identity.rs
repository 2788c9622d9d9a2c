//! Connection strings and SAS tokens. (being written)
